"""Django settings for the TabSync test OAuth 2.0 authorization server.

Test-only configuration: nothing here is fit for production.
"""

import os
from pathlib import Path

DATA_DIR = Path(os.environ.get("AUTHSERVER_DATA", "."))

SECRET_KEY = "tabsync-test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "oauth2_provider",
    "testcontrol",
]

MIDDLEWARE = [
    # Outermost: sees every request and the final status code.
    "testcontrol.middleware.TestControlMiddleware",
    "django.middleware.common.CommonMiddleware",
]

ROOT_URLCONF = "authserver.urls"
WSGI_APPLICATION = "authserver.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DATA_DIR / "db.sqlite3",
        # Each view runs in one transaction that takes SQLite's write lock at
        # BEGIN (IMMEDIATE), so token requests are serialized: validating and
        # rotating a refresh token is atomic, and concurrent requests queue on
        # the lock (up to `timeout` s) instead of failing with "database is
        # locked". Without this, concurrent refreshes with one refresh token
        # race inside django-oauth-toolkit (validation runs outside its
        # transaction and SELECT ... FOR UPDATE is a no-op on SQLite): several
        # of them get 200, some with different new tokens.
        "ATOMIC_REQUESTS": True,
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Fast hashing for user passwords and client secrets (CLIENT_SECRET_HASHER
# "default" = the first entry here).
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"

OAUTH2_PROVIDER = {
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    # 0 unless a test asks for a reuse grace period (serve --grace SECONDS).
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": int(os.environ.get("AUTHSERVER_GRACE", "0")),
    "ACCESS_TOKEN_EXPIRE_SECONDS": int(os.environ.get("AUTHSERVER_ACCESS_TTL", "4")),
    "REFRESH_TOKEN_EXPIRE_SECONDS": int(os.environ.get("AUTHSERVER_REFRESH_TTL", "3600")),
    # PKCE only concerns the authorization-code grant; the tests use the
    # password and refresh_token grants.
    "PKCE_REQUIRED": False,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(message)s"}},
    "handlers": {
        "stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "plain"},
        "stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
    },
    "loggers": {
        # One line per request (testcontrol.middleware).
        "authserver": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
        # Tracebacks of 500s.
        "django.request": {"handlers": ["stderr"], "level": "ERROR", "propagate": False},
        # Silence the per-request RFC 9700 "password grant is discouraged" nag.
        "oauth2_provider": {"handlers": ["stderr"], "level": "ERROR", "propagate": False},
    },
}
