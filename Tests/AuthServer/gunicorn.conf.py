# gunicorn configuration for the TabSync test OAuth server (see ./serve).
# The listening socket is bound by serve.py and handed over as --bind fd://N.
import os

wsgi_app = "authserver.wsgi:application"
# Exactly ONE worker: the /test/* counters live in that process's memory.
workers = 1
worker_class = "gthread"
threads = int(os.environ.get("AUTHSERVER_THREADS", "16"))
# Load Django in the master so that READY means "application imported".
preload_app = True
accesslog = None  # testcontrol.middleware logs one line per request instead
errorlog = "-"
loglevel = "warning"
timeout = 300  # worker heartbeat; /test/slow may park request threads for a while
graceful_timeout = 2
keepalive = 5


def when_ready(server):
    port = server.LISTENERS[0].sock.getsockname()[1]
    print(f"READY http://127.0.0.1:{port}", flush=True)
