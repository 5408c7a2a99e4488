from django.apps import AppConfig


class TestControlConfig(AppConfig):
    name = "testcontrol"
    verbose_name = "TabSync test-control endpoints"
