"""Helpers for tests: DICOM files to upload, clients, peers."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pydicom
import pytest
from django.test import Client
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from portal.models import User

PASSWORD = "correct horse battery staple 42"


def peer_missing(reason: str) -> NoReturn:
    """Something the test needs (a program, a plugin, PostgreSQL) is not here: fail in CI, skip
    elsewhere, printing why."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def require_peer(program: str) -> str:
    """The path of an external program the test needs. Missing: fail in CI, skip elsewhere."""
    path = shutil.which(program)
    if path is None:
        peer_missing(f"{program} is not installed (Debian package; .ci/run installs it)")
    return path


def require_postgresql(reason: str) -> None:
    """The test needs PostgreSQL (CI runs the suite with DATABASE_URL); `reason` says why."""
    from django.db import connection

    if connection.vendor != "postgresql":
        peer_missing(reason)


def client_for(user: User | None, *, second_factor: bool = True) -> Client:
    """A client signed in as `user` as if they had just typed their password (and, when they need
    one, used their second factor: an authenticator app is enrolled for them). Pass
    second_factor=False for a session that never used one."""
    client = Client()
    if user is not None:
        client.force_login(user)
        full_sign_in_record(client, user, second_factor=second_factor)
    return client


def full_sign_in_record(client: Client, user: User, *, second_factor: bool = True) -> None:
    """Write into the client's session what allauth records after a password sign-in just
    confirmed again (and a second factor, for people who need one)."""
    import time

    from allauth.account.internal.flows.login import (
        _AUTHENTICATION_METHODS_USER_SESSION_KEY,
        AUTHENTICATION_METHODS_SESSION_KEY,
        user_id_to_str,
    )

    from portal.second_factor import mfa_required

    now = time.time()
    # As a real sign-in leaves it: AccountAdapter.post_login marks it a confirmation.
    records: list[dict[str, Any]] = [
        {"method": "password", "at": now, "email": user.email, "reauthenticated": True}
    ]
    if second_factor and mfa_required(user):
        authenticator = totp_enroll(user)
        records.append({"method": "mfa", "at": now, "type": "totp", "id": authenticator.pk})
    session = client.session
    session[AUTHENTICATION_METHODS_SESSION_KEY] = records
    session[_AUTHENTICATION_METHODS_USER_SESSION_KEY] = user_id_to_str(user)
    session.save()


def sign_in_age(client: Client, seconds: float) -> None:
    """Make the client's sign-in (and any confirmation since) `seconds` old: past
    ACCOUNT_REAUTHENTICATION_TIMEOUT, a sensitive change asks for the password again."""
    import time

    from allauth.account.internal.flows.login import AUTHENTICATION_METHODS_SESSION_KEY

    session = client.session
    records = session[AUTHENTICATION_METHODS_SESSION_KEY]
    for record in records:
        record["at"] = time.time() - seconds
        record.pop("reauthenticated", None)
    session[AUTHENTICATION_METHODS_SESSION_KEY] = records
    session.save()


def totp_enroll(user: User) -> Any:
    """The user's authenticator-app second factor, enrolled now if they have none; its secret is
    readable with `totp_secret(authenticator)`."""
    from allauth.mfa.models import Authenticator
    from allauth.mfa.totp.internal.auth import TOTP, generate_totp_secret

    existing = Authenticator.objects.filter(user=user, type=Authenticator.Type.TOTP).first()
    if existing is not None:
        return existing
    return TOTP.activate(user, generate_totp_secret()).instance


def totp_secret(authenticator: Any) -> str:
    from allauth.mfa.utils import decrypt

    return decrypt(authenticator.data["secret"])


def totp_code(secret: str, *, offset: int = 0) -> str:
    """The 6-digit code an authenticator app shows now for this base32 secret (RFC 6238, written
    here from the RFC rather than taken from the library under test)."""
    import base64
    import hashlib
    import hmac
    import struct
    import time

    # Near the end of a 30-second step the code could expire before the server checks it
    # (allauth allows no drift by default): wait for the next step rather than race it.
    left = 30 - time.time() % 30
    if left < 3:
        time.sleep(left + 0.05)
    key = base64.b32decode(secret.upper() + "=" * (-len(secret) % 8))
    counter = int(time.time()) // 30 + offset
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    start = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[start : start + 4])[0] & 0x7FFFFFFF
    return f"{value % 1_000_000:06d}"


def read_testdata(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def dicom_bytes(name: str = "CT_small.dcm", **changes: Any) -> bytes:
    """A pydicom test file, re-saved with the given attribute changes (new UIDs by default)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = changes.pop("SOPInstanceUID", generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def upload(
    client: Client,
    data: bytes,
    *,
    facility: str = "krmc",
    token: str | None = None,
    filename: str = "x.dcm",
) -> Any:
    headers = {"HTTP_X_FILENAME": filename}
    if token:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client.post(
        f"/api/v1/instances?facility={facility}",
        data=data,
        content_type="application/dicom",
        **headers,
    )


def gateway_allow(facility: Any, calling: str, *, addresses: str = "127.0.0.1 ::1") -> None:
    """Let senders with these calling AE titles in at the gateway from this machine: access is
    deny by default, as a facility's admin would set it up."""
    type(facility).objects.filter(pk=facility.pk).update(
        gateway_calling_aes=calling, gateway_addresses=addresses
    )
    facility.refresh_from_db()


@contextmanager
def gateway_running() -> Iterator[int]:
    """Relay's DICOM gateway listening on a free loopback port (yielded) for the block."""
    import socket

    from transfers.dicom.gateway import Gateway

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = Gateway(ae_title="RELAY").start(host="127.0.0.1", port=port)
    try:
        yield port
    finally:
        server.shutdown()
