"""HTTP routes: the chat pages and token API, admin, accounts, metrics."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from monitoring import views as monitoring_views

urlpatterns = [
    path("", include("chat.urls")),
    path("admin/", admin.site.urls),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", monitoring_views.healthz, name="healthz"),
    path("readyz", monitoring_views.readyz, name="readyz"),
    path("", include("django_prometheus.urls")),
]
