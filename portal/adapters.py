"""How django-allauth fits Relay: nobody signs up on their own, e-mail goes through the Celery
task, second-factor secrets are stored encrypted, and single sign-on creates members only for
the facility whose identity provider vouched for the e-mail address."""

from __future__ import annotations

from typing import Any

from allauth.account.adapter import DefaultAccountAdapter
from allauth.account.internal.flows.login import AUTHENTICATION_METHODS_SESSION_KEY
from allauth.mfa.adapter import DefaultMFAAdapter
from allauth.mfa.models import Authenticator
from allauth.socialaccount.adapter import DefaultSocialAccountAdapter
from django.core.exceptions import ValidationError
from django.http import HttpRequest
from django.utils.html import escape

from .crypto import secret_decrypt, secret_encrypt
from .second_factor import mfa_required


class AccountAdapter(DefaultAccountAdapter):
    def is_open_for_signup(self, request: HttpRequest) -> bool:
        # Accounts come from invitations (and single sign-on, see below), never a public form.
        return False

    def post_login(self, request: HttpRequest, user: Any, **kwargs: Any) -> Any:
        """A sign-in that just checked the password (and second factor) is a confirmation:
        allauth counts only one asked for afterwards, so a person who had just signed in was
        asked for the password again at their first sensitive change. The sign-in's records
        are marked as one; RELAY_REAUTH_SECONDS later, changes ask again as before."""
        response = super().post_login(request, user, **kwargs)
        records = request.session.get(AUTHENTICATION_METHODS_SESSION_KEY)
        if records:
            request.session[AUTHENTICATION_METHODS_SESSION_KEY] = [
                {**record, "reauthenticated": True} for record in records
            ]
        return response

    def pre_authenticate(self, request: HttpRequest, **credentials: Any) -> None:
        """allauth refuses a sign-in from an address over its failure limit before checking the
        password, so Django's failed-login signal never fires: the refusal is audited here."""
        try:
            super().pre_authenticate(request, **credentials)
        except ValidationError:
            from .access import home_facility
            from .audit import audit_record
            from .models import AuditAction, Outcome, User

            email = str(credentials.get("email") or credentials.get("username") or "")[:254]
            user = User.objects.filter(email__iexact=email).first() if email else None
            audit_record(
                action=AuditAction.LOGIN_FAILED,
                request=request,
                facility=home_facility(user),
                outcome=Outcome.FAILURE,
                detail={"email": email, "reason": "too many failed sign-ins from this address"},
            )
            raise

    def pre_login(self, request: HttpRequest, user: Any, **kwargs: Any) -> Any:
        """A locked account stays locked whatever the way in (a passkey or single sign-on do not
        pass through the password check that django-axes guards)."""
        from .lockout import account_locked, lockout_response

        if account_locked(request, user.email):
            return lockout_response(request)
        return super().pre_login(request, user, **kwargs)

    def send_mail(self, template_prefix: str, email: str, context: dict[str, Any]) -> None:
        from .tasks import email_send

        message = self.render_mail(template_prefix, email, context)
        html = None
        for content, mimetype in getattr(message, "alternatives", []):
            if mimetype == "text/html":
                html = content
        html = html or f"<pre>{escape(message.body)}</pre>"
        email_send.delay(to=email, subject=message.subject, text=message.body, html=html)


class SocialAccountAdapter(DefaultSocialAccountAdapter):
    def is_open_for_signup(self, request: HttpRequest, sociallogin: Any) -> bool:
        from .sso import sso_for_login

        # A new account only for a verified address in a domain of the provider's facility.
        return sso_for_login(sociallogin) is not None

    def list_providers(self, request: HttpRequest) -> list[Any]:
        """Only facilities' enabled single sign-on entries are offered on the sign-in page (a
        sign-in already under way through a disabled one is still refused and audited)."""
        from .models import SingleSignOn

        on = set(SingleSignOn.objects.filter(enabled=True).values_list("app_id", flat=True))
        return [
            p
            for p in super().list_providers(request)
            if getattr(getattr(p, "app", None), "pk", None) in on
        ]

    def on_authentication_error(
        self,
        request: HttpRequest,
        provider: Any,
        error: Any = None,
        exception: Any = None,
        extra_context: Any = None,
    ) -> None:
        """A sign-in that broke off at the provider (refused token, wrong issuer) is audited."""
        from .sso import sso_error_record

        sso_error_record(request, provider, error)
        super().on_authentication_error(
            request, provider, error=error, exception=exception, extra_context=extra_context
        )


class MFAAdapter(DefaultMFAAdapter):
    """Authenticator-app secrets are encrypted in the database (Fernet, a key derived from
    RELAY_MFA_KEY or SECRET_KEY): a copy of the database alone does not give the codes."""

    def encrypt(self, text: str) -> str:
        return secret_encrypt(text)

    def decrypt(self, encrypted_text: str) -> str:
        return secret_decrypt(encrypted_text)

    def can_delete_authenticator(self, authenticator: Authenticator) -> bool:
        # Someone who must have a second factor keeps at least one (besides recovery codes).
        if authenticator.type == Authenticator.Type.RECOVERY_CODES:
            return True
        if not mfa_required(authenticator.user):
            return True
        others = Authenticator.objects.filter(user=authenticator.user).exclude(pk=authenticator.pk)
        return others.exclude(type=Authenticator.Type.RECOVERY_CODES).exists()
