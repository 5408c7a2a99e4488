from django.db import transaction
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from oauth2_provider.models import get_access_token_model, get_refresh_token_model

from . import state


@require_GET
def stats(request):
    return JsonResponse(state.stats())


@require_GET
def reused(request):
    return JsonResponse({"reused": state.reused()})


@csrf_exempt
@require_POST
def slow(request):
    """The next `count` refresh_token grants sleep `seconds` before processing."""
    try:
        seconds = float(request.GET.get("seconds", "0"))
        count = int(request.GET.get("count", "1"))
    except ValueError:
        return JsonResponse({"error": "seconds must be a number, count an integer"}, status=400)
    state.set_slow(seconds, count)
    return JsonResponse({"seconds": seconds, "count": count})


@csrf_exempt
@require_POST
def revoke_all(request):
    """Revoke every refresh token and access token, as an admin would."""
    with transaction.atomic():
        refresh = get_refresh_token_model().objects.filter(revoked__isnull=True)
        n_refresh = refresh.update(revoked=timezone.now(), access_token=None)
        access = get_access_token_model().objects.all()
        n_access = access.count()
        access.delete()
    return JsonResponse({"refresh_tokens_revoked": n_refresh, "access_tokens_revoked": n_access})
