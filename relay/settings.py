"""Relay's one settings module.

Everything is driven by environment variables read through the small typed helpers of
relay/env.py; importing it writes nothing to disk.
The defaults run a fresh checkout on embedded parts (SQLite, a folder for images, a Celery
broker kept in files, e-mail written to a folder); production is this same file with the
variables from the README's table set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url

from .env import (
    BASE_DIR,
    broker_dir,
    embedded_secret_key,
    env_bool,
    env_int,
    env_list,
    env_str,
    var_dir,
)

VAR_DIR = var_dir()

DEBUG = env_bool("DEBUG", False)

# A fresh checkout has no secret: `make run` (relay.embedded) makes one under var/, never in the
# repository, so that sessions survive restarts. Production sets SECRET_KEY.
SECRET_KEY = env_str("SECRET_KEY") or embedded_secret_key()

SITE_URL = env_str("SITE_URL", "http://127.0.0.1:8000").rstrip("/")
ALLOWED_HOSTS = env_list(
    "ALLOWED_HOSTS", "127.0.0.1,localhost," + (urlsplit(SITE_URL).hostname or "")
)
CSRF_TRUSTED_ORIGINS = [SITE_URL]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "relay",
    "portal",
    "transfers",
    "billing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "relay.urls"
WSGI_APPLICATION = "relay.wsgi.application"

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
                "portal.context_processors.relay",
            ],
        },
    },
]

# Database: SQLite under var/ unless DATABASE_URL names PostgreSQL.
DATABASE_URL = env_str("DATABASE_URL")
_SQLITE_OPTIONS = {
    "timeout": 30,
    "transaction_mode": "IMMEDIATE",
    "init_command": "PRAGMA journal_mode=WAL;",
}
if DATABASE_URL:
    DATABASES = {
        "default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=True)
    }
    if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        DATABASES["default"]["OPTIONS"] = dict(_SQLITE_OPTIONS)
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(VAR_DIR / "relay.sqlite3"),
            "CONN_MAX_AGE": 60,
            # Several processes (web, worker, beat) share the file; wait for locks.
            "OPTIONS": dict(_SQLITE_OPTIONS),
            # A file, not memory, so that a Celery worker started by a test can open it; one per
            # test process so that two test runs on one machine do not share it.
            "TEST": {
                "NAME": str(Path(tempfile.gettempdir()) / f"test-relay-{os.getpid()}.sqlite3")
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_USER_MODEL = "portal.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 10},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "studies"
LOGOUT_REDIRECT_URL = "login"
PASSWORD_RESET_TIMEOUT = 60 * 60 * 24

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "America/Denver")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"  # made by relay.embedded.var_prepare (or collectstatic)
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(VAR_DIR / "media")))

# Object storage: a folder under var/ unless S3_BUCKET is set. Nothing else in the code knows
# which one it is: it asks django.core.files.storage.storages["default"].
S3_BUCKET = env_str("S3_BUCKET")
if S3_BUCKET:
    _default_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": S3_BUCKET,
            "endpoint_url": env_str("S3_ENDPOINT_URL") or None,
            "region_name": env_str("S3_REGION") or None,
            "access_key": env_str("S3_ACCESS_KEY_ID") or None,
            "secret_key": env_str("S3_SECRET_ACCESS_KEY") or None,
            "default_acl": None,
            "querystring_auth": True,
            "file_overwrite": False,
        },
    }
else:
    _default_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {
            "location": MEDIA_ROOT,
            "file_permissions_mode": 0o600,
            "directory_permissions_mode": 0o700,
        },
    }
STORAGES = {
    "default": _default_storage,
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
if not DEBUG and not (STATIC_ROOT / "staticfiles.json").exists():
    # Before `collectstatic` has run (tests, a fresh checkout) serve from the source folders.
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}
    WHITENOISE_USE_FINDERS = True

# Uploads: bodies larger than this spill from memory to temporary files.
FILE_UPLOAD_MAX_MEMORY_SIZE = env_int("RELAY_UPLOAD_MEMORY_BYTES", 4 * 1024 * 1024)
FILE_UPLOAD_TEMP_DIR = env_str("RELAY_UPLOAD_TEMP_DIR") or None
RELAY_MAX_UPLOAD_BYTES = env_int("RELAY_MAX_UPLOAD_BYTES", 2 * 1024 * 1024 * 1024)
RELAY_MAX_SEQUENCE_DEPTH = env_int("RELAY_MAX_SEQUENCE_DEPTH", 32)
RELAY_STUDY_QUIET_SECONDS = env_int("RELAY_STUDY_QUIET_SECONDS", 300)
RELAY_INVITATION_DAYS = env_int("RELAY_INVITATION_DAYS", 7)

# Billing (see the README's Billing section): the calendar that decides a delivery's month, who
# pays for patient links ("sender" or "none"), the currency of the default plan and the courier
# comparison, what one courier CD costs, and the default plan's price per GB when first made.
RELAY_BILLING_TIME_ZONE = env_str("RELAY_BILLING_TIME_ZONE", "America/Denver")
RELAY_BILL_PATIENT_LINKS_TO = env_str("RELAY_BILL_PATIENT_LINKS_TO", "sender")
RELAY_BILLING_CURRENCY = env_str("RELAY_BILLING_CURRENCY", "USD")
RELAY_COURIER_CD_PRICE = env_str("RELAY_COURIER_CD_PRICE", "11.00")
RELAY_DEFAULT_PRICE_PER_GB = env_str("RELAY_DEFAULT_PRICE_PER_GB", "1.00")

# Address-space cap of each render worker process, in MiB (0: none). A file that makes a decoder
# ask for more gets a MemoryError for that frame instead of the OOM killer taking the worker.
RELAY_WORKER_MEMORY_MB = env_int("RELAY_WORKER_MEMORY_MB", 0)

# The DICOM gateway (`manage.py dicom_gateway`): one listening port for every facility; each
# facility's PACS calls it by the facility's own AE title. Loopback unless told otherwise.
DICOM_GATEWAY_AE_TITLE = env_str("DICOM_GATEWAY_AE_TITLE", "RELAY")
DICOM_GATEWAY_BIND = env_str("DICOM_GATEWAY_BIND", "127.0.0.1")
DICOM_GATEWAY_PORT = env_int("DICOM_GATEWAY_PORT", 11112)

# Cache and Celery broker: Redis when REDIS_URL is set; otherwise nothing that needs a server.
REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
    CELERY_BROKER_URL = REDIS_URL
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {"visibility_timeout": 3600}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    # The folders are made by relay.embedded.var_prepare when a process starts.
    _broker_dir = broker_dir()
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = True

# E-mail: SMTP when EMAIL_HOST is set, otherwise one file per message under var/mail.
EMAIL_HOST = env_str("EMAIL_HOST")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_PORT = env_int("EMAIL_PORT", 587)
    EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
    EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
    EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
    EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
else:
    EMAIL_BACKEND = env_str("EMAIL_BACKEND", "portal.mail.PrivateFileEmailBackend")
    EMAIL_FILE_PATH = env_str("EMAIL_FILE_PATH", str(VAR_DIR / "mail"))
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "Relay <relay@localhost>")

# Security: production runs behind a TLS-terminating proxy.
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 60 * 60 * 8)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
if not DEBUG and SITE_URL.startswith("https://"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 60 * 60 * 24 * 365)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    # The header only allows submission to the preload list; submitting stays the operator's call.
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # Tokens in paths and query strings (patient names in searches) never reach a log line.
    "filters": {"redact": {"()": "relay.logs.RedactingFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "server": {
            "()": "django.utils.log.ServerFormatter",
            "format": "[{server_time}] {message}",
            "style": "{",
        },
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["redact"]},
        # The dev server's access log (`make run`), as Django logs it, redacted.
        "server": {"class": "logging.StreamHandler", "formatter": "server", "filters": ["redact"]},
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "pydicom": {"level": "ERROR"},
        "django.server": {"handlers": ["server"], "level": "INFO", "propagate": False},
    },
}
