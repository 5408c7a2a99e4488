from django.urls import include, path

from testcontrol import views

urlpatterns = [
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("test/stats", views.stats),
    path("test/reused", views.reused),
    path("test/slow", views.slow),
    path("test/revoke-all", views.revoke_all),
]
