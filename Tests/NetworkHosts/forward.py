#!/usr/bin/env python3
"""TCP forwarder for the two-host tests: `forward.py LISTEN_HOST:PORT=TARGET_HOST:PORT ...`.

Prints READY once every listener is bound; runs until killed. Stdlib only.
"""
import asyncio
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main():
    servers = []
    for spec in sys.argv[1:]:
        listen, target = spec.split("=")
        lhost, lport = listen.rsplit(":", 1)
        thost, tport = target.rsplit(":", 1)

        async def handle(reader, writer, thost=thost, tport=int(tport)):
            try:
                treader, twriter = await asyncio.open_connection(thost, tport)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, twriter), pipe(treader, writer))

        servers.append(await asyncio.start_server(handle, lhost, int(lport)))
    print("READY", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


asyncio.run(main())
