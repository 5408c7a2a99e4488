"""Test-control state, kept in process memory behind a lock.

Correct across gunicorn threads. It is NOT shared between gunicorn worker
processes, which is why `serve` runs exactly one worker (with many threads).
"""

import hashlib
import threading

_lock = threading.Lock()
_counts = {"refresh": 0, "password": 0, "revoke": 0, "refresh_failed": 0, "refresh_in_flight": 0}
_seen_refresh_tokens = set()  # sha256 hex digests, never the tokens
_reused = 0
_slow_seconds = 0.0
_slow_remaining = 0


def refresh_received(refresh_token):
    """Record a refresh_token grant on arrival; return seconds to sleep first."""
    global _reused, _slow_remaining
    digest = hashlib.sha256(refresh_token.encode()).hexdigest() if refresh_token else None
    with _lock:
        _counts["refresh"] += 1
        _counts["refresh_in_flight"] += 1
        if digest is not None:
            if digest in _seen_refresh_tokens:
                _reused += 1
            _seen_refresh_tokens.add(digest)
        if _slow_remaining > 0:
            _slow_remaining -= 1
            return _slow_seconds
        return 0.0


def refresh_done():
    """A refresh_token grant was answered (or failed)."""
    with _lock:
        _counts["refresh_in_flight"] -= 1


def count(key):
    with _lock:
        _counts[key] += 1


def stats():
    with _lock:
        return dict(_counts)


def reused():
    with _lock:
        return _reused


def set_slow(seconds, count):
    global _slow_seconds, _slow_remaining
    with _lock:
        _slow_seconds, _slow_remaining = seconds, count
