"""The project's only settings module.

Every value comes from the environment (a `.env` file is read too); with nothing set
the project runs on the embedded defaults of SPEC.md: SQLite, local-memory cache and
limits, eager Celery. Each variable appears once, next to its default, and again in
`.env.example`.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from dotenv import load_dotenv

BASE_DIR = Path(__file__).resolve().parent.parent
load_dotenv(BASE_DIR / ".env", override=False)


def env_str(name: str, default: str = "") -> str:
    """A string variable; `NAME_FILE` may point at a file holding it (for secrets)."""
    file_name = os.getenv(f"{name}_FILE")
    if file_name:
        return Path(file_name).read_text().strip()
    return os.getenv(name) or default


def env_bool(name: str, default: bool) -> bool:
    value = os.getenv(name, "").strip().lower()
    if value not in {"", "1", "0", "true", "false", "yes", "no", "on", "off"}:
        raise ImproperlyConfigured(f"{name}={value!r}: use true or false")
    return default if value == "" else value in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.getenv(name, "").strip()
    try:
        return default if value == "" else int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={value!r}: expected an integer") from exc


def env_float(name: str, default: float) -> float:
    value = os.getenv(name, "").strip()
    try:
        return default if value == "" else float(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={value!r}: expected a number") from exc


def env_list(name: str, default: str) -> list[str]:
    return [
        item.strip() for item in (os.getenv(name) or default).split(",") if item.strip()
    ]


# --- Django core -----------------------------------------------------------------

DEV_SECRET_KEY = "django-insecure-dev-only-key-do-not-use-in-production"  # noqa: S105
SECRET_KEY = env_str("DJANGO_SECRET_KEY", DEV_SECRET_KEY)
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "daphne",  # makes `runserver` daphne's ASGI development server
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "rest_framework",
    "rest_framework_simplejwt",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "keys",
    "relay",
    "usage",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "gateway_project.urls"
ASGI_APPLICATION = "gateway_project.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ----------------------------------------------------------------------

DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        # WAL lets the web process, the usage writer and commands read while one
        # writes; IMMEDIATE takes the write lock up front instead of failing midway.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    # A file, not :memory:, so servers started by the tests share the test database;
    # one per test run, so parallel runs on one checkout don't clobber each other.
    DATABASES["default"]["TEST"] = {
        "NAME": str(Path(tempfile.gettempdir()) / f"gateway-test-{os.getpid()}.sqlite3")
    }
else:
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # One test database per test run, so parallel runs on one server don't collide.
    DATABASES["default"]["TEST"] = {
        "NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, limits, channel layer -------------------------------------------

REDIS_URL = os.getenv("REDIS_URL") or None
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 2, "SOCKET_TIMEOUT": 2},
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Celery --------------------------------------------------------------------------

CELERY_BROKER_URL = os.getenv("CELERY_BROKER_URL") or REDIS_URL
CELERY_TASK_ALWAYS_EAGER = CELERY_BROKER_URL is None
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_BACKEND = None
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {
    "rollup-recent-days": {"task": "usage.tasks.rollup_recent_days", "schedule": 300.0},
    "flush-orphaned-usage": {"task": "usage.tasks.flush_usage", "schedule": 60.0},
    "prune-usage": {"task": "usage.tasks.prune_usage", "schedule": 3600.0},
}

# --- Auth, i18n, static ---------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {
        "NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"
    },
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/admin/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Without collectstatic (the embedded default), serve straight from the apps' folders;
# whitenoise's warning that STATIC_ROOT is missing is then expected.
WHITENOISE_USE_FINDERS = True
warnings.filterwarnings("ignore", message="No directory at", module="whitenoise.base")

# --- Security (production sets DJANGO_HTTPS=true behind TLS) ---------------------------

HTTPS = env_bool("DJANGO_HTTPS", False)
SECURE_SSL_REDIRECT = HTTPS and env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
SECURE_REDIRECT_EXEMPT = [r"^health", r"^metrics"]
SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = HTTPS
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
if env_bool("DJANGO_BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
X_FRAME_OPTIONS = "DENY"

# --- REST framework ---------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework_simplejwt.authentication.JWTAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 100,
    "COERCE_DECIMAL_TO_STRING": True,
    # Services raise Django's ValidationError: a 400, not DRF's default 500.
    "EXCEPTION_HANDLER": "keys.api.exception_handler",
}
SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(
        minutes=env_int("GATEWAY_JWT_ACCESS_MINUTES", 15)
    ),
    "REFRESH_TOKEN_LIFETIME": timedelta(days=env_int("GATEWAY_JWT_REFRESH_DAYS", 1)),
    "SIGNING_KEY": env_str("GATEWAY_JWT_SIGNING_KEY", SECRET_KEY),
    "UPDATE_LAST_LOGIN": True,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "LLM gateway admin API",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # /api/docs/ from the project's own static files: no CDN, works offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Logging: JSON lines on standard output ------------------------------------------------

LOG_LEVEL = env_str("GATEWAY_LOG_LEVEL", "INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact": {"()": "gateway_project.logs.RedactSecretsFilter"}},
    "formatters": {"json": {"()": "gateway_project.logs.JsonFormatter"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "json",
            "filters": ["redact"],
        }
    },
    "root": {"handlers": ["stdout"], "level": LOG_LEVEL},
    "loggers": {
        # The servers' own access logs stay off (--no-access-log, -v 0): the gateway
        # writes one access line per request itself, without secrets.
        "uvicorn.access": {"level": "WARNING"},
        "django.server": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
    },
}

# --- The gateway's own knobs ------------------------------------------------------------------

# Time zone of billing days and months.
GATEWAY_BILLING_TZ = env_str("GATEWAY_BILLING_TZ", "UTC")
# Keyed hash of API key secrets. Changing it invalidates every issued key.
GATEWAY_KEY_HASH_SECRET = env_str("GATEWAY_KEY_HASH_SECRET", SECRET_KEY)
# Fernet key (urlsafe base64, 32 bytes) encrypting provider keys at rest; derived
# from SECRET_KEY when unset.
GATEWAY_ENCRYPTION_KEY = env_str("GATEWAY_ENCRYPTION_KEY", "")
# Proxies (IPs or CIDR ranges) whose X-Forwarded-For is believed for keys' IP
# allowlists; empty: the client is the TCP peer, forwarded headers are ignored.
GATEWAY_TRUSTED_PROXIES = env_list("GATEWAY_TRUSTED_PROXIES", "")
# Request bodies larger than this are refused with 413.
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 10 * 1024 * 1024)
# How often each process checks whether keys, models or prices changed.
GATEWAY_SNAPSHOT_POLL_S = env_float("GATEWAY_SNAPSHOT_POLL_S", 0.25)
# Where finished requests' usage rows wait until the database has them.
GATEWAY_USAGE_SPOOL_DIR = Path(
    env_str("GATEWAY_USAGE_SPOOL_DIR", str(BASE_DIR / "var" / "usage-spool"))
)
GATEWAY_USAGE_FLUSH_INTERVAL_S = env_float("GATEWAY_USAGE_FLUSH_INTERVAL_S", 0.2)
GATEWAY_USAGE_BATCH_SIZE = env_int("GATEWAY_USAGE_BATCH_SIZE", 500)
# Recent billing days each report read checks against the ledger and rebuilds
# when rows arrived since: fresh reports without beat (0 turns it off).
GATEWAY_REPORTS_LIVE_DAYS = env_int("GATEWAY_REPORTS_LIVE_DAYS", 7)
# Ledger rows older than this many billing days are pruned (0: kept forever);
# rollups keep their totals.
GATEWAY_USAGE_RETENTION_DAYS = env_int("GATEWAY_USAGE_RETENTION_DAYS", 0)
GATEWAY_USAGE_PRUNE_BATCH_SIZE = env_int("GATEWAY_USAGE_PRUNE_BATCH_SIZE", 5000)
# Prefix of every Redis key the gateway writes; default: derived from the database,
# so deployments (and test runs) sharing one Redis never mix their counters.
GATEWAY_REDIS_NAMESPACE = env_str("GATEWAY_REDIS_NAMESPACE", "")
# After a client disconnects mid-stream, how long to keep reading the upstream for usage.
GATEWAY_DISCONNECT_GRACE_S = env_float("GATEWAY_DISCONNECT_GRACE_S", 5.0)
# Retries of connect errors, 429 and 5xx, before the first byte reaches the client.
GATEWAY_UPSTREAM_RETRIES = env_int("GATEWAY_UPSTREAM_RETRIES", 2)
GATEWAY_UPSTREAM_RETRY_BACKOFF_S = env_float("GATEWAY_UPSTREAM_RETRY_BACKOFF_S", 0.1)
GATEWAY_UPSTREAM_MAX_CONNECTIONS = env_int("GATEWAY_UPSTREAM_MAX_CONNECTIONS", 1000)
# Output tokens reserved against quotas when neither the request (max_tokens) nor the
# model (max_output_tokens) says how many it may produce.
GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS = env_int("GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS", 4096)
# Redis unreachable: each process enforces this share of request and token rates
# (set it to the number of web processes); cost budgets are refused instead.
GATEWAY_QUOTA_FALLBACK_SHARE = env_int("GATEWAY_QUOTA_FALLBACK_SHARE", 1)
GATEWAY_QUOTA_REDIS_TIMEOUT_S = env_float("GATEWAY_QUOTA_REDIS_TIMEOUT_S", 0.5)
