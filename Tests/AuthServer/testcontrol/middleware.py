import logging
import time

from . import state

log = logging.getLogger("authserver")


class TestControlMiddleware:
    """Counts token-endpoint traffic, injects delays, logs one line per request."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        grant = None
        if request.method == "POST" and request.path == "/o/token/":
            grant = request.POST.get("grant_type", "")
            if grant == "refresh_token":
                delay = state.refresh_received(request.POST.get("refresh_token", ""))
                try:
                    if delay > 0:
                        time.sleep(delay)
                    response = self.get_response(request)
                finally:
                    state.refresh_done()
            elif grant == "password":
                state.count("password")
        elif request.method == "POST" and request.path == "/o/revoke_token/":
            state.count("revoke")

        if grant != "refresh_token":
            response = self.get_response(request)

        if grant == "refresh_token" and response.status_code != 200:
            state.count("refresh_failed")
        # Never log token values: method, path and grant type only.
        detail = f" grant_type={grant}" if grant is not None else ""
        log.info("authserver: %s %s%s -> %d", request.method, request.path, detail, response.status_code)
        return response
