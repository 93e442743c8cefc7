"""HTTP routes: the chat pages and token API, admin, accounts, health.

Metrics are not served here: each process exports them on its own CHAT_METRICS_PORT
(monitoring.exporter), so a balancer never decides which process Prometheus sees.
"""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from monitoring import views as monitoring_views

urlpatterns = [
    path("", include("chat.urls")),
    path("admin/", admin.site.urls),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # Also answered by monitoring.middleware ahead of the host check; routed for reverse().
    path("healthz", monitoring_views.healthz, name="healthz"),
    path("readyz", monitoring_views.readyz, name="readyz"),
]
