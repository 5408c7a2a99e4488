"""Fault-injecting HTTP proxy for TabSync's integration tests (stdlib only).

Sits between `tab` processes and the test authorization server (README.md)
and, on request, loses or delays the answers to refresh requests:

    python3 Tests/AuthServer/proxy.py --upstream http://127.0.0.1:PORT [--port 0]

Prints `READY http://127.0.0.1:PORT` once listening, then one line per request
(never tokens, bodies or Authorization headers). Requests are forwarded with
method, path, headers (minus hop-by-hop ones; Host rewritten) and Content-Length
body; every client connection is closed after one response.

Control endpoints (answered here, never forwarded):
  POST /proxy/mode?mode=MODE[&count=N][&seconds=S][&status=CODE]
      the next N (default 1) form POSTs with grant_type=refresh_token get MODE,
      then it reverts to `pass`. Modes: pass; drop (forward, read the whole
      answer, close the client connection without a byte); delay (forward, read
      the answer, relay it after S s, default 30); refuse-empty (not forwarded:
      400 with an empty body); status (not forwarded: CODE with an empty body).
  GET /proxy/stats
      {"refresh_forwarded": N, "refresh_answered": N, "refresh_faulted": N}:
      refresh grants sent upstream, relayed in full, and hit by a fault.
"""

import argparse
import http.client
import json
import os
import select
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

TIMEOUT = 30  # seconds, for every upstream socket operation (and idle clients)
MODES = ("pass", "drop", "delay", "refuse-empty", "status")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
              "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host"}

lock = threading.Lock()  # guards fault, stats and stdout
fault = {"mode": "pass", "count": 0, "seconds": 30.0, "status": 400}
stats = {"refresh_forwarded": 0, "refresh_answered": 0, "refresh_faulted": 0}


def log(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def take_fault():
    """Consume one application of the current fault mode: (mode, seconds, status)."""
    with lock:
        if fault["mode"] == "pass" or fault["count"] <= 0:
            return "pass", 0, 0
        fault["count"] -= 1
        mode, seconds, status = fault["mode"], fault["seconds"], fault["status"]
        if fault["count"] == 0:
            fault["mode"] = "pass"
        stats["refresh_faulted"] += 1
        return mode, seconds, status


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = TIMEOUT
    upstream = None  # urlsplit() of --upstream, set in main()

    def log_message(self, fmt, *args):  # used by log_error only: our access log is log()
        sys.stderr.write("proxy: " + (fmt % args) + "\n")

    def reply(self, status, body=b"", headers=(), reason=None):
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def client_gone(self):
        """True if the client has closed its end (EOF or reset pending)."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def handle_any(self):
        self.close_connection = True
        url = urlsplit(self.path)
        length = self.headers.get("Content-Length", "0").strip()
        if not length.isdigit() or self.request_version == "HTTP/0.9" or "Transfer-Encoding" in self.headers:
            return self.send_error(400, "need HTTP/1.x and a Content-Length body")
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            return self.log_error("client closed during %s %s body; not forwarded", self.command, url.path)
        if url.path.startswith("/proxy/"):
            return self.control(url)
        grant = None  # like Django, only look into form-encoded POST bodies
        if self.command == "POST" and "x-www-form-urlencoded" in self.headers.get("Content-Type", ""):
            grant = parse_qs(body.decode("latin-1")).get("grant_type", [None])[0]
        refresh = grant == "refresh_token"
        grant = grant and "".join(c for c in grant[:40] if c.isalnum() or c in "_-.:")  # one safe line
        mode, seconds, status = take_fault() if refresh else ("pass", 0, 0)
        desc = f"proxy: {self.command} {url.path}" + (f" grant_type={grant}" if grant else "")
        desc += f" mode={mode}" if refresh else ""
        if mode in ("refuse-empty", "status"):
            code = 400 if mode == "refuse-empty" else status
            log(f"{desc} -> {code}")
            return self.reply(code)
        try:
            code, reason, headers, data = self.forward(body, refresh)
        except (OSError, http.client.HTTPException) as e:
            self.log_error("upstream %s %s failed: %r", self.command, url.path, e)
            log(f"{desc} -> 502")
            return self.reply(502)
        if mode == "drop":
            return log(f"{desc} -> {code} (dropped)")  # nothing written; the server closes the socket
        note = ""
        if mode == "delay":
            time.sleep(seconds)
            note = f" (delayed {seconds:g} s)"
        if self.client_gone():  # e.g. it timed out during the delay
            return log(f"{desc} -> {code}{note} (client gone)")
        with lock:  # count before the client can see the answer, so stats never lag
            stats["refresh_answered"] += refresh
        try:
            self.reply(code, data, headers, reason)
        except OSError:
            with lock:
                stats["refresh_answered"] -= refresh
            return log(f"{desc} -> {code}{note} (client gone)")
        log(f"{desc} -> {code}{note}")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any

    def forward(self, body, refresh):
        up = self.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port or 80, timeout=TIMEOUT)
        try:
            conn.putrequest(self.command, up.path.rstrip("/") + self.path,
                            skip_host=True, skip_accept_encoding=True)
            skip = HOP_BY_HOP | {"content-length"} | {
                t.strip().lower() for t in self.headers.get("Connection", "").split(",")}
            for k, v in self.headers.items():
                if k.lower() not in skip:
                    conn.putheader(k, v)
            conn.putheader("Host", up.netloc)
            if body or self.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.putheader("Connection", "close")
            conn.endheaders(body or None)
            if refresh:
                with lock:
                    stats["refresh_forwarded"] += 1
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        keep_length = self.command == "HEAD" or resp.status in (204, 304)
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP
                   and (keep_length or k.lower() != "content-length")]
        return resp.status, resp.reason, headers, data

    def control(self, url):
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if self.command == "GET" and url.path == "/proxy/stats":
            with lock:
                out = dict(stats)
        elif self.command == "POST" and url.path == "/proxy/mode":
            try:
                mode = q.get("mode", "")
                if mode not in MODES:
                    raise ValueError(f"mode must be one of {', '.join(MODES)}")
                count, seconds = int(q.get("count", 1)), float(q.get("seconds", 30))
                status = int(q.get("status", 400))
                if count < 0 or not 0 <= seconds <= 3600 or not 200 <= status <= 599:
                    raise ValueError("bad count, seconds or status")
            except ValueError as e:
                log(f"proxy: {self.command} {self.path} -> 400")
                return self.reply(400, json.dumps({"ok": False, "error": str(e)}).encode(),
                                  [("Content-Type", "application/json")])
            with lock:
                fault.update(mode=mode, count=count, seconds=seconds, status=status)
            out = {"ok": True}
        else:
            log(f"proxy: {self.command} {url.path} -> 404")
            return self.reply(404)
        log(f"proxy: {self.command} {self.path} -> 200")
        self.reply(200, json.dumps(out).encode(), [("Content-Type", "application/json")])


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):  # e.g. a client that went away
        sys.stderr.write(f"proxy: request from {client_address[1]} failed: {sys.exc_info()[1]!r}\n")


def main():
    # A parent may have spawned us with signals blocked (posix_spawn inherits the
    # mask): unblock them so that SIGTERM/SIGINT stop us.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    p = argparse.ArgumentParser(prog="proxy.py", description="TabSync fault-injecting test proxy")
    p.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: pick a free one)")
    args = p.parse_args()
    Handler.upstream = urlsplit(args.upstream)
    if Handler.upstream.scheme != "http" or not Handler.upstream.hostname:
        p.error("--upstream must be an http:// URL")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    server = Server(("127.0.0.1", args.port), Handler)
    log(f"READY http://127.0.0.1:{server.server_address[1]}")
    try:
        server.serve_forever(poll_interval=0.2)
    except SystemExit:
        pass
    server.server_close()
    with lock:  # no handler thread is mid-write; exit without waiting for daemon threads
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
