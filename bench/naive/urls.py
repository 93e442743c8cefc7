"""No HTTP views: the baseline only serves the socket."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
