"""Prepare the data directory, then run gunicorn. Run through ./serve."""

import argparse
import os
import socket
import sqlite3
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

USERS = (("alice", "wonderland"), ("bob", "builder"))
CLIENT_ID = "tabsync-test"
CLIENT_SECRET = "tabsync-secret"


def parse_args():
    p = argparse.ArgumentParser(prog="serve", description="TabSync test OAuth 2.0 authorization server")
    p.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 (0: pick a free one)")
    p.add_argument("--data", required=True, help="directory for the SQLite database")
    p.add_argument("--access-ttl", type=int, help="access token lifetime in seconds (default 4)")
    p.add_argument("--refresh-ttl", type=int, help="refresh token lifetime in seconds (default 3600)")
    p.add_argument("--grace", type=int, help="refresh token reuse grace period in seconds (default 0)")
    return p.parse_args()


def seed():
    """Create the test users and OAuth client (idempotent)."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import check_password
    from oauth2_provider.models import get_application_model

    User = get_user_model()
    for name, password in USERS:
        user, created = User.objects.get_or_create(username=name)
        if created or not user.check_password(password):
            user.set_password(password)
            user.save()

    Application = get_application_model()
    app = Application.objects.filter(client_id=CLIENT_ID).first() or Application(client_id=CLIENT_ID)
    if app.pk is None or not check_password(CLIENT_SECRET, app.client_secret):
        # Confidential client for the password grant (which also enables the
        # refresh_token grant). hash_client_secret=True: the secret is stored
        # hashed (MD5, see settings) and accepted via HTTP Basic auth and via
        # the client_id/client_secret form fields.
        app.name = "TabSync tests"
        app.client_secret = CLIENT_SECRET
        app.hash_client_secret = True
        app.client_type = Application.CLIENT_CONFIDENTIAL
        app.authorization_grant_type = Application.GRANT_PASSWORD
        app.save()


def copy_db(src, dst):
    """Consistent copy of an SQLite database (WAL-safe), atomic at dst."""
    tmp = f"{dst}.{os.getpid()}.tmp"
    with sqlite3.connect(src) as a, sqlite3.connect(tmp) as b:
        a.backup(b)
    a.close()
    b.close()
    os.replace(tmp, dst)


def main():
    # A parent may have spawned us with signals blocked (posix_spawn inherits the spawning
    # thread's mask): unblock them so that SIGTERM stops gunicorn.
    import signal
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    args = parse_args()
    data = os.path.abspath(args.data)
    os.makedirs(data, exist_ok=True)
    os.environ["AUTHSERVER_DATA"] = data
    if args.access_ttl is not None:
        os.environ["AUTHSERVER_ACCESS_TTL"] = str(args.access_ttl)
    if args.refresh_ttl is not None:
        os.environ["AUTHSERVER_REFRESH_TTL"] = str(args.refresh_ttl)
    if args.grace is not None:
        os.environ["AUTHSERVER_GRACE"] = str(args.grace)
    os.environ["DJANGO_SETTINGS_MODULE"] = "authserver.settings"
    sys.path.insert(0, HERE)

    # Migrating a fresh database takes ~1-2 s, so the first run leaves a
    # migrated, seeded copy in the venv (rebuilt with it when requirements.txt
    # changes) and later runs start from that copy; migrate + seed still run
    # (as no-ops) to pick up anything newer.
    db = os.path.join(data, "db.sqlite3")
    template = os.path.join(sys.prefix, "authserver-template.sqlite3")
    if not os.path.exists(db) and os.path.exists(template):
        copy_db(template, db)

    import django
    from django.core.management import call_command
    from django.db import connections

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    seed()
    connections.close_all()
    if not os.path.exists(template):
        copy_db(db, template)

    # Bind here (port 0 -> the kernel picks a free port, no race) and hand the
    # socket to gunicorn, which reports the real port in its READY line.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))

    # Run gunicorn in this process (Django is already loaded: faster than exec).
    from gunicorn.app.wsgiapp import run

    os.chdir(HERE)
    sys.argv = ["gunicorn", "--config", os.path.join(HERE, "gunicorn.conf.py"), "--bind", f"fd://{sock.detach()}"]
    run()


if __name__ == "__main__":
    main()
