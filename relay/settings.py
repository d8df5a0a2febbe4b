"""Relay's one settings module.

Everything is driven by environment variables read through the small typed helpers of
relay/env.py; importing it writes nothing to disk.
The defaults run a fresh checkout on embedded parts (SQLite, a folder for images, a Celery
broker kept in a SQLite file, e-mail written to a folder); production is this same file with the
variables from the README's table set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from csp.constants import NONCE, NONE, SELF
from django.core.exceptions import ImproperlyConfigured

from .embedded import broker_database
from .env import (
    BASE_DIR,
    embedded_secret_key,
    env_bool,
    env_int,
    env_list,
    env_str,
    var_dir,
)
from .storage import s3_storage

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
    "django.contrib.humanize",  # allauth's security-key list loads it
    "allauth",
    "allauth.account",
    "allauth.mfa",
    "allauth.socialaccount",
    "allauth.socialaccount.providers.openid_connect",
    "axes",
    "csp",
    "relay",
    "portal",
    "transfers",
    "billing",
]

MIDDLEWARE = [
    # /health/live/ and /health/ready/ answered first (relay.health): a load balancer asks each
    # node by its own address over plain HTTP, which ALLOWED_HOSTS and the SSL redirect refuse.
    "relay.health.HealthMiddleware",
    # Behind the TLS proxy, the client's address from X-Forwarded-For when the connection comes
    # from one of RELAY_TRUSTED_PROXIES (relay.proxy): first, so that everything below sees it.
    "relay.proxy.ForwardedForMiddleware",
    # Each request's id, on every log line written while answering it (relay.logs).
    "relay.logs.RequestIdMiddleware",
    # Counts and times every answer, and answers /metrics (relay.metrics: why here).
    "relay.metrics.MetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Refuses a NUL in the path, query string or any header (400) and a URL over
    # RELAY_MAX_URL_CHARS (414) before the session, sign-in or any view sees it.
    "relay.limits.HostileRequestMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # No-store on everything but static files, and Permissions-Policy (relay.headers); the
    # Content-Security-Policy with a per-response nonce (django-csp). Above the middleware that
    # answers on its own (sign-in, second factor, lockout, CSRF) so those answers get them too;
    # below WhiteNoise, whose static files keep their caching.
    "relay.headers.SecurityHeadersMiddleware",
    "csp.middleware.CSPMiddleware",
    # Database down (or a disk full): 503 + Retry-After, JSON under /api/, a maintenance page
    # elsewhere (relay.unavailable). Below the header middleware so its answers get them; above
    # the session, sign-in and everything else that reads the database.
    "relay.unavailable.ServiceUnavailableMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # Ends idle and over-long sessions (README: Sessions); after the messages (the sign-in page
    # says why), before the second-factor middleware (an ended session owes nothing).
    "portal.middleware.SessionTimeoutMiddleware",
    # After authentication and the session limits, before the CSRF check reads request.POST:
    # someone not signed in may not send a body over RELAY_ANONYMOUS_BODY_BYTES (413, nothing read).
    "relay.limits.AnonymousBodyLimitMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Staff and facility admins (and every member of a facility that asks) reach nothing but the
    # second-factor pages until they have one and used it to sign in.
    "portal.second_factor.SecondFactorRequiredMiddleware",
    # Last, as django-axes asks: answers a locked-out account's sign-in with the lockout page.
    "axes.middleware.AxesMiddleware",
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
                "transfers.ohif.context_processors.ohif",
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
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"
PASSWORD_RESET_TIMEOUT = 60 * 60 * 24

# Sign-in (README: Security). django-axes counts failed passwords per account and locks it;
# django-allauth runs the sign-in form, the second factor (authenticator apps, security keys
# and passkeys, recovery codes), single sign-on over OpenID Connect, re-authentication before
# sensitive changes, and the per-address rate limits.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
AXES_FAILURE_LIMIT = env_int("RELAY_LOCKOUT_FAILURES", 5)
AXES_COOLOFF_TIME = env_int("RELAY_LOCKOUT_MINUTES", 30) / 60  # hours; admins unlock earlier
AXES_LOCKOUT_PARAMETERS = ["username"]
# Per address, allauth's "login_failed" rate below limits failures across accounts; locking the
# address itself in axes would lock out a whole hospital behind one NAT address.
SILENCED_SYSTEM_CHECKS = ["axes.W006"]
AXES_USERNAME_CALLABLE = "portal.lockout.attempted_username"
AXES_USERNAME_FORM_FIELD = "login"
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "portal.lockout.lockout_response"
AXES_ENABLE_ACCESS_FAILURE_LOG = False
AXES_VERBOSE = False
# Behind the proxy, REMOTE_ADDR is the client's (relay.proxy, RELAY_TRUSTED_PROXIES; README).
AXES_IPWARE_META_PRECEDENCE_ORDER = ["REMOTE_ADDR"]
# The addresses or networks of the TLS proxies (load balancers) in front of Relay, whose
# X-Forwarded-For names the client (comma-separated; unset: no proxy is believed).
RELAY_TRUSTED_PROXIES = env_list("RELAY_TRUSTED_PROXIES")

ACCOUNT_ADAPTER = "portal.adapters.AccountAdapter"
SOCIALACCOUNT_ADAPTER = "portal.adapters.SocialAccountAdapter"
MFA_ADAPTER = "portal.adapters.MFAAdapter"
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_USER_MODEL_USERNAME_FIELD = None
ACCOUNT_UNIQUE_EMAIL = True
# People join by invitation (verified by the link they were sent) or by their facility's SSO.
ACCOUNT_EMAIL_VERIFICATION = "none"
MFA_ALLOW_UNVERIFIED_EMAIL = True
# "Trust this device" on the sign-in form: unticked, the cookie ends with the browser.
ACCOUNT_SESSION_REMEMBER = None
SESSION_EXPIRE_AT_BROWSER_CLOSE = True
ACCOUNT_LOGOUT_ON_PASSWORD_CHANGE = False
ACCOUNT_REAUTHENTICATION_TIMEOUT = env_int("RELAY_REAUTH_SECONDS", 300)
ACCOUNT_EMAIL_UNKNOWN_ACCOUNTS = False
ACCOUNT_PREVENT_ENUMERATION = True
# People are e-mailed when their password, e-mail or second factors change (no PHI in them).
ACCOUNT_EMAIL_NOTIFICATIONS = True
ACCOUNT_EMAIL_SUBJECT_PREFIX = "[Relay] "
ACCOUNT_RATE_LIMITS = {
    "login": env_str("RELAY_RATE_LOGIN", "60/m/ip"),
    # Failed sign-ins from one address across any accounts (a shared hospital address has many
    # people behind it, so this is looser than the per-account lock).
    # Per account as well (second-factor codes count here, per person), above axes' lock.
    "login_failed": env_str("RELAY_RATE_LOGIN_FAILED", "15/15m/ip,10/15m/key"),
    "reset_password": env_str("RELAY_RATE_PASSWORD_RESET", "10/h/ip,3/h/key"),
    "reset_password_from_key": "20/m/ip",
    # Relay's own: wrong invitation links and refused API tokens, per address.
    "invitation_failed": env_str("RELAY_RATE_INVITATION_FAILED", "10/15m/ip"),
    "api_token_failed": env_str("RELAY_RATE_TOKEN_FAILED", "20/15m/ip"),
    # "Test connection" on the DICOM page opens a connection from the server.
    "destination_echo": env_str("RELAY_RATE_DESTINATION_ECHO", "6/m/user"),
}
MFA_SUPPORTED_TYPES = ["totp", "webauthn", "recovery_codes"]
MFA_FORMS = {
    "authenticate": "portal.second_factor.LockAwareAuthenticateForm",
    "authenticate_webauthn": "portal.second_factor.AuditedAuthenticateWebAuthnForm",
}
MFA_PASSKEY_LOGIN_ENABLED = True
MFA_TOTP_ISSUER = env_str("RELAY_MFA_ISSUER", "Relay")
MFA_WEBAUTHN_ALLOW_INSECURE_ORIGIN = env_bool("RELAY_WEBAUTHN_INSECURE_ORIGIN", False)
SOCIALACCOUNT_EMAIL_AUTHENTICATION = True
SOCIALACCOUNT_EMAIL_AUTHENTICATION_AUTO_CONNECT = True
SOCIALACCOUNT_LOGIN_ON_GET = False
SOCIALACCOUNT_STORE_TOKENS = False
SOCIALACCOUNT_ONLY = False
# The facility identity providers' sign-ins carry a PKCE code challenge (S256).
SOCIALACCOUNT_PROVIDERS = {"openid_connect": {"OAUTH_PKCE_ENABLED": True}}

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "America/Denver")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"  # made by relay.embedded.var_prepare (or collectstatic)
# The OHIF viewer installed by `manage.py ohif_install` (make install with npm): site/ below it.
RELAY_OHIF_DIR = Path(env_str("RELAY_OHIF_DIR", str(VAR_DIR / "ohif")))
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(VAR_DIR / "media")))
# Declared by the operator once MEDIA_ROOT sits on an encrypted volume (check --deploy warns until).
RELAY_STORAGE_ENCRYPTED = env_bool("RELAY_STORAGE_ENCRYPTED", False)
# storage_verify: objects younger than this are not called extra (an upload writes its object
# before its row); a scheduled run stops after this many seconds and resumes next time.
RELAY_STORAGE_VERIFY_GRACE_MINUTES = env_int("RELAY_STORAGE_VERIFY_GRACE_MINUTES", 60)
RELAY_STORAGE_VERIFY_SECONDS = env_int("RELAY_STORAGE_VERIFY_SECONDS", 3000)

# Object storage: a folder under var/ unless S3_BUCKET is set. Nothing else in the code knows
# which one it is: it asks django.core.files.storage.storages["default"].
S3_BUCKET = env_str("S3_BUCKET")
if S3_BUCKET:
    # Every object asks for server-side encryption (relay/storage.py; README: Encryption at rest).
    _default_storage = s3_storage(
        bucket=S3_BUCKET,
        endpoint_url=env_str("S3_ENDPOINT_URL") or None,
        region=env_str("S3_REGION") or None,
        access_key=env_str("S3_ACCESS_KEY_ID") or None,
        secret_key=env_str("S3_SECRET_ACCESS_KEY") or None,
        sse=env_str("S3_SSE", "AES256"),
        kms_key_id=env_str("S3_SSE_KMS_KEY_ID"),
    )
else:
    _default_storage = {
        # Django's folder storage, writing each object whole or not at all (relay/storage.py).
        "BACKEND": "relay.storage.AtomicFileSystemStorage",
        "OPTIONS": {
            "location": MEDIA_ROOT,
            "file_permissions_mode": 0o600,
            "directory_permissions_mode": 0o700,
        },
    }
STORAGES = {
    "default": _default_storage,
    # Hashed, compressed and cached for a year once `collectstatic` has run (relay.static);
    # before that, the source files' own names.
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "relay.static.StaticStorage"
    },
}
if not DEBUG and not (STATIC_ROOT / "staticfiles.json").exists():
    # Before `collectstatic` has run (tests, a fresh checkout) serve from the source folders.
    WHITENOISE_USE_FINDERS = True

# Uploads: bodies larger than this spill from memory to temporary files.
FILE_UPLOAD_MAX_MEMORY_SIZE = env_int("RELAY_UPLOAD_MEMORY_BYTES", 4 * 1024 * 1024)
FILE_UPLOAD_TEMP_DIR = env_str("RELAY_UPLOAD_TEMP_DIR") or None
# The Retry-After of every 503 (database, image store or temporary disk unavailable).
RELAY_RETRY_AFTER_SECONDS = env_int("RELAY_RETRY_AFTER_SECONDS", 30)
RELAY_MAX_UPLOAD_BYTES = env_int("RELAY_MAX_UPLOAD_BYTES", 2 * 1024 * 1024 * 1024)
RELAY_MAX_SEQUENCE_DEPTH = env_int("RELAY_MAX_SEQUENCE_DEPTH", 32)
# Hostile requests (README: Hostile requests): limits met before any view reads the request.
RELAY_ANONYMOUS_BODY_BYTES = env_int("RELAY_ANONYMOUS_BODY_BYTES", 64 * 1024)
RELAY_MAX_URL_CHARS = env_int("RELAY_MAX_URL_CHARS", 8192)
RELAY_JSON_MAX_BYTES = env_int("RELAY_JSON_MAX_BYTES", 8 * 1024 * 1024)
RELAY_JSON_MAX_DEPTH = env_int("RELAY_JSON_MAX_DEPTH", 16)
# A deflated data set is inflated as a stream and refused (413) beyond the smaller of these: an
# absolute size and a ratio to the compressed size (any file may still inflate to 64 MiB).
RELAY_MAX_INFLATED_BYTES = env_int("RELAY_MAX_INFLATED_BYTES", 1024 * 1024 * 1024)
RELAY_MAX_INFLATE_RATIO = env_int("RELAY_MAX_INFLATE_RATIO", 200)
RELAY_STUDY_QUIET_SECONDS = env_int("RELAY_STUDY_QUIET_SECONDS", 300)
# Images `relay send` announced hold their study open this long at most (then the quiet period
# completes it as it would anyway).
RELAY_EXPECTED_HOURS = env_int("RELAY_EXPECTED_HOURS", 72)
RELAY_INVITATION_DAYS = env_int("RELAY_INVITATION_DAYS", 7)

# Billing (see the README's Billing section): the calendar that decides a delivery's month, who
# pays for patient links ("sender" or "none"), the currency of the default plan and the courier
# comparison, what one courier CD costs, and the default plan's price per GB when first made.
RELAY_BILLING_TIME_ZONE = env_str("RELAY_BILLING_TIME_ZONE", "America/Denver")
RELAY_BILL_PATIENT_LINKS_TO = env_str("RELAY_BILL_PATIENT_LINKS_TO", "sender")
RELAY_BILLING_CURRENCY = env_str("RELAY_BILLING_CURRENCY", "USD")
RELAY_COURIER_CD_PRICE = env_str("RELAY_COURIER_CD_PRICE", "11.00")
RELAY_DEFAULT_PRICE_PER_GB = env_str("RELAY_DEFAULT_PRICE_PER_GB", "1.00")
# Who issues the invoices (printed at their top, as an accounts-payable clerk needs): the
# seller's name, postal address (lines separated by newlines, or by a literal "\n" in a .env
# file), tax id (VAT/EIN), and the days from issue to due date.
RELAY_SELLER_NAME = env_str("RELAY_SELLER_NAME", "Relay")
RELAY_SELLER_ADDRESS = env_str("RELAY_SELLER_ADDRESS", "")
RELAY_SELLER_TAX_ID = env_str("RELAY_SELLER_TAX_ID", "")
RELAY_PAYMENT_TERMS_DAYS = env_int("RELAY_PAYMENT_TERMS_DAYS", 30)

# Address-space cap of each render worker process, in MiB (0: none). A file that makes a decoder
# ask for more gets a MemoryError for that frame instead of the OOM killer taking the worker.
RELAY_WORKER_MEMORY_MB = env_int("RELAY_WORKER_MEMORY_MB", 0)

# The DICOM gateway (`manage.py dicom_gateway`): one listening port for every facility; each
# facility's PACS calls it by the facility's own AE title. Loopback unless told otherwise.
DICOM_GATEWAY_AE_TITLE = env_str("DICOM_GATEWAY_AE_TITLE", "RELAY")
DICOM_GATEWAY_BIND = env_str("DICOM_GATEWAY_BIND", "127.0.0.1")
DICOM_GATEWAY_PORT = env_int("DICOM_GATEWAY_PORT", 11112)
# DICOM TLS (transfers/dicom/tls.py): Relay's certificate and key (PEM files) make the gateway
# listen with TLS on its own port too (2762 is DICOM's registered TLS port) and are presented to
# TLS destinations that ask for a client certificate. Senders' client certificates must chain to
# DICOM_GATEWAY_TLS_CLIENT_CA (a PEM bundle); each facility lists the ones it accepts.
DICOM_TLS_CERTIFICATE = env_str("DICOM_TLS_CERTIFICATE")
DICOM_TLS_KEY = env_str("DICOM_TLS_KEY")
DICOM_GATEWAY_TLS_PORT = env_int("DICOM_GATEWAY_TLS_PORT", 2762)
DICOM_GATEWAY_TLS_CLIENT_CA = env_str("DICOM_GATEWAY_TLS_CLIENT_CA")
# Private storage SOP classes the gateway accepts besides the standard ones, the retired ones and
# Siemens' CSA Non-Image (comma-separated UIDs).
DICOM_GATEWAY_EXTRA_SOP_CLASSES = env_list("DICOM_GATEWAY_EXTRA_SOP_CLASSES")
# The largest PDU the gateway receives (bytes; 0: no limit), offered to every sender: big PDUs
# cost fewer Python steps per instance than pynetdicom's 16 KiB, and each is spooled to the file.
DICOM_GATEWAY_MAX_PDU = env_int("DICOM_GATEWAY_MAX_PDU", 1024 * 1024)
# Gateway processes sharing the port(s) (`dicom_gateway --processes`): one per CPU core lets
# concurrent associations use every core, at one process's memory each.
DICOM_GATEWAY_PROCESSES = env_int("DICOM_GATEWAY_PROCESSES", 1)
# The gateways /health/ready/ checks ("host:port", comma-separated): each must accept a TCP
# connection, as a network balancer in front of them checks (relay.health). Empty: no check.
RELAY_HEALTH_GATEWAYS = env_list("RELAY_HEALTH_GATEWAYS")

# Cache and Celery broker: Redis when REDIS_URL is set; otherwise nothing that needs a server.
# Either broker keeps a task until the worker acknowledges it after running it (relay.celery acks
# late): a task whose worker died is delivered again RELAY_BROKER_VISIBILITY_TIMEOUT seconds
# after it was fetched, so that must exceed the longest task (hard limit 360 s) and the longest
# retry countdown (an hour), or a task still running or waiting for its retry runs twice.
RELAY_BROKER_VISIBILITY_TIMEOUT = env_int("RELAY_BROKER_VISIBILITY_TIMEOUT", 3900)
REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
    CELERY_BROKER_URL = REDIS_URL
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {
        "visibility_timeout": RELAY_BROKER_VISIBILITY_TIMEOUT,
        # Look for such tasks every 10 s (kombu's default scans every 10th sweep only).
        "unacked_restore_throttle": 1,
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    # One SQLite file under RELAY_BROKER_DIR (relay.broker; the file broker of earlier versions
    # could not keep a task through a worker crash).
    CELERY_BROKER_TRANSPORT = "relay.broker:Transport"
    CELERY_BROKER_URL = f"sqlite:///{broker_database()}"
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": RELAY_BROKER_VISIBILITY_TIMEOUT}
# RabbitMQ (or another AMQP broker) instead: RELAY_BROKER_URL=amqp://user:password@host:5672/vhost.
# Redis stays the cache when REDIS_URL is set too. RabbitMQ gives an unacknowledged task back as
# soon as the worker's connection drops (no visibility timeout), but it closes a channel that holds
# a delivery unacknowledged longer than its consumer_timeout (30 minutes by default), and retries
# wait up to an hour on the worker: set consumer_timeout above RELAY_BROKER_VISIBILITY_TIMEOUT
# (README: A task survives its worker being killed).
RELAY_BROKER_URL = env_str("RELAY_BROKER_URL")
if RELAY_BROKER_URL:
    if not RELAY_BROKER_URL.startswith(("amqp://", "amqps://", "pyamqp://")):
        raise ImproperlyConfigured("RELAY_BROKER_URL must be an amqp:// or amqps:// URL.")
    CELERY_BROKER_URL = RELAY_BROKER_URL
    CELERY_BROKER_TRANSPORT = "pyamqp"
    CELERY_BROKER_TRANSPORT_OPTIONS = {}
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = True
# Celery's workers and beat log through LOGGING below (redacted, UTC) instead of replacing the
# root logger's handlers with their own (local time, no redaction).
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

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
    # No SMTP server: the embedded default writes each message to a private file. In production
    # (an https:// SITE_URL, DEBUG off) that would keep every share notice and password reset on
    # the server unread: there sending fails loudly until EMAIL_HOST is set (`check --deploy`
    # says so first, relay.E001), unless EMAIL_BACKEND names a backend on purpose.
    EMAIL_BACKEND = env_str(
        "EMAIL_BACKEND",
        "portal.mail.UndeliverableEmailBackend"
        if SITE_URL.startswith("https://") and not DEBUG
        else "portal.mail.PrivateFileEmailBackend",
    )
    EMAIL_FILE_PATH = env_str("EMAIL_FILE_PATH", str(VAR_DIR / "mail"))
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "Relay <relay@localhost>")

# Security: production runs behind a TLS-terminating proxy.
SESSION_COOKIE_HTTPONLY = True
# Sessions end after RELAY_SESSION_IDLE_MINUTES without a request and RELAY_SESSION_MAX_HOURS
# after sign-in (portal.middleware; the page warns before the idle end).
RELAY_SESSION_IDLE_MINUTES = env_int("RELAY_SESSION_IDLE_MINUTES", 15)
RELAY_SESSION_IDLE_SECONDS = env_int("RELAY_SESSION_IDLE_SECONDS", 0) or None  # overrides minutes
RELAY_SESSION_MAX_HOURS = env_int("RELAY_SESSION_MAX_HOURS", 12)
RELAY_SESSION_WARN_SECONDS = env_int("RELAY_SESSION_WARN_SECONDS", 120)
SESSION_COOKIE_AGE = RELAY_SESSION_MAX_HOURS * 60 * 60
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"  # Django's default, stated: tested on every URL
# Scripts and styles only from our static files (or an element with this response's nonce); no
# inline script, no eval, no plugins, no framing. data: images: allauth's authenticator-app QR
# code. No form-action: browsers apply it to the redirect after a form is sent, and single
# sign-on redirects to the facility's identity provider (an address kept in the database).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF, NONCE],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "font-src": [SELF],
        "object-src": [NONE],
        "frame-src": [NONE],
        "base-uri": [NONE],
        "frame-ancestors": [NONE],
        "report-uri": env_str("RELAY_CSP_REPORT_URI") or None,
    },
}
if not DEBUG and SITE_URL.startswith("https://"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 60 * 60 * 24 * 365)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    # The header only allows submission to the preload list; submitting stays the operator's call.
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)

# Wrong patient-link answers from one address, across every link: this many within the window
# (seconds) block that address's answers for the block time (seconds).
PATIENT_LINK_ADDRESS_FAILURES = env_int("PATIENT_LINK_ADDRESS_FAILURES", 20)
PATIENT_LINK_ADDRESS_WINDOW = env_int("PATIENT_LINK_ADDRESS_WINDOW", 600)
PATIENT_LINK_ADDRESS_BLOCK = env_int("PATIENT_LINK_ADDRESS_BLOCK", 3600)

# The audit trail's feed to a SIEM (portal.siem): IHE ATNA syslog over TLS; empty = off.
RELAY_AUDIT_SYSLOG = env_str("RELAY_AUDIT_SYSLOG")
RELAY_AUDIT_SYSLOG_CA = env_str("RELAY_AUDIT_SYSLOG_CA")
RELAY_AUDIT_SYSLOG_CERT = env_str("RELAY_AUDIT_SYSLOG_CERT")
RELAY_AUDIT_SYSLOG_KEY = env_str("RELAY_AUDIT_SYSLOG_KEY")
RELAY_AUDIT_SOURCE_ID = env_str("RELAY_AUDIT_SOURCE_ID")  # default: host of SITE_URL
RELAY_AUDIT_SYSLOG_TIMEOUT = env_int("RELAY_AUDIT_SYSLOG_TIMEOUT", 10)
RELAY_AUDIT_SYSLOG_GAP_SECONDS = env_int("RELAY_AUDIT_SYSLOG_GAP_SECONDS", 60)
# Second-factor secrets are encrypted with a key derived from this (or SECRET_KEY).
RELAY_MFA_KEY = env_str("RELAY_MFA_KEY")

# Prometheus metrics (README: Metrics; relay/metrics.py, portal/metrics.py). /metrics answers
# only a scrape with this bearer token and/or from these addresses or networks (comma-separated);
# with neither set it is off (404). Each node's processes count in files under RELAY_METRICS_DIR;
# a node without a web server serves them on RELAY_METRICS_BIND:RELAY_METRICS_PORT (0: not) from
# its Celery worker or gateway.
RELAY_METRICS_TOKEN = env_str("RELAY_METRICS_TOKEN")
RELAY_METRICS_ALLOW = env_list("RELAY_METRICS_ALLOW")
RELAY_METRICS_DIR = Path(env_str("RELAY_METRICS_DIR") or str(VAR_DIR / "metrics"))
RELAY_METRICS_PORT = env_int("RELAY_METRICS_PORT", 0)
RELAY_METRICS_BIND = env_str("RELAY_METRICS_BIND", "127.0.0.1")

# Log lines as text (plain) or one JSON object each (json: relay.logs.JsonFormatter), in every
# process; gunicorn's own lines follow the same variable (relay.logs.RedactingGunicornLogger).
RELAY_LOG_FORMAT = env_str("RELAY_LOG_FORMAT", "plain").strip().lower()
if RELAY_LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured("RELAY_LOG_FORMAT must be plain or json.")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # Tokens in paths and query strings (patient names in searches) never reach a log line.
    "filters": {"redact": {"()": "relay.logs.RedactingFilter"}},
    "formatters": {
        # UTC with a Z, in every process (relay.logs.UtcFormatter).
        "plain": {
            "()": "relay.logs.UtcFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
        },
        "server": {
            "()": "django.utils.log.ServerFormatter",
            "format": "[{server_time}] {message}",
            "style": "{",
        },
        "json": {"()": "relay.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if RELAY_LOG_FORMAT == "json" else "plain",
            "filters": ["redact"],
        },
        # The dev server's access log (`make run`), as Django logs it, redacted.
        "server": {
            "class": "logging.StreamHandler",
            "formatter": "json" if RELAY_LOG_FORMAT == "json" else "server",
            "filters": ["redact"],
        },
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "pydicom": {"level": "ERROR"},
        # django-axes logs every sign-in at INFO; the audit trail has them already.
        "axes": {"level": "WARNING"},
        "django.server": {"handlers": ["server"], "level": "INFO", "propagate": False},
    },
}
