"""Drives the Python peer of docs/FORMAT.md (section 10) for the interop tests: the module's code
is taken from the document itself, so that what the document shows is what is tested.

    peer_driver.py FORMAT.md DIRECTORY ORIGIN

Reads commands on stdin, one per line, and prints JSON lines on stdout:
    set KEY VALUE     -> {"type": "ok", "seq": N}           (one commit)
    hold SECONDS      -> {"type": "held"} ... {"type": "released"}  (holds the commit locks)
and, polling every 5 ms, every change of the others:
                         {"type": "storage", "key", "oldValue", "newValue", "origin", "seq", "resync"?}
"""
import json, os, re, sys, threading, time

document, directory, origin = sys.argv[1:4]
source = re.search(r"^## 10\..*?```python\n(.*?)```", open(document).read(), re.S | re.M).group(1)
peer = {}
exec(compile(source, document + " (section 10)", "exec"), peer)

storage = peer["Storage"](directory, name="app", origin=origin)
guard, out = threading.Lock(), threading.Lock()

def emit(obj):
    with out:
        sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()

def deliver(events):
    for e in events:
        event = {"type": "storage", "key": e["key"], "oldValue": e["old"], "newValue": e["new"], "origin": e["origin"], "seq": e["seq"]}
        if e.get("resync"): event["resync"] = True
        emit(event)

with guard: storage.poll()  # the starting point
emit({"type": "ready"})

def watch():
    while True:
        with guard: deliver(storage.poll())
        time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()

for line in sys.stdin:
    words = line.rstrip("\n").split(" ", 2)
    if words[0] == "set" and len(words) == 3:
        with guard:
            events, seq = storage.commit({words[1]: words[2]})
            deliver(events)
        emit({"type": "ok", "cmd": "set", "seq": seq})
    elif words[0] == "hold" and len(words) == 2:
        lock = storage.lock()
        directory_lock = storage.lock_directory()
        emit({"type": "held"})
        time.sleep(float(words[1]))
        os.close(directory_lock); os.close(lock)
        emit({"type": "released"})
    else:
        emit({"type": "error", "code": "badCommand", "message": line.strip()})
