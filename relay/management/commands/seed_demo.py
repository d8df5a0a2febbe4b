"""`manage.py seed_demo`: three facilities modelled on the first users, with people and a study.

Runs once: a second call only prints the logins again. Passwords are random, made here, and
kept in var/demo-logins.txt (never in the repository).
"""

from __future__ import annotations

import io
import secrets
from pathlib import Path
from typing import Any

import pydicom
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from portal.models import Facility, Membership, Role, User
from transfers.ingest import instance_ingest
from transfers.models import PacsDestination, RoutingRule, Study, StudyStatus

FACILITIES = [
    # slug, name, city, AE title, has a PACS
    ("krmc", "Kalispell Regional Medical Center", "Kalispell", "KRMC_RELAY", True),
    ("gfc", "Great Falls Clinic", "Great Falls", "GFC_RELAY", True),
    ("stluke", "St. Luke Community Healthcare", "Ronan", None, False),
]
# Printed on patient handouts; 555-01xx numbers are reserved for fiction.
HELP_DESK_PHONES = {
    "krmc": "+1 406-555-0142",
    "gfc": "+1 406-555-0171",
    "stluke": "+1 406-555-0119",
}


def logins_file() -> Path:
    return Path(settings.VAR_DIR) / "demo-logins.txt"


def demo_ct_series(count: int = 12) -> list[bytes]:
    """A small CT series made from pydicom's bundled CT_small.dcm, one slice per position."""
    source = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    slices = []
    for index in range(count):
        ds = source.copy()
        ds.PatientName = "DEMO^ANNA^M"
        ds.PatientID = "KRMC-100234"
        ds.PatientBirthDate = "19610412"
        ds.PatientSex = "F"
        ds.AccessionNumber = "A2026-0042"
        ds.StudyDescription = "CT CHEST WITHOUT CONTRAST"
        ds.SeriesDescription = "AXIAL 5MM"
        ds.ReferringPhysicianName = "WELBY^MARCUS"
        ds.StudyDate = ds.SeriesDate = "20261102"
        ds.StudyTime = "093000"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        ds.SliceLocation = -100.0 + index * 5
        ds.ImagePositionPatient = [-158.1, -179.0, -100.0 + index * 5]
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        slices.append(buffer.getvalue())
    return slices


def _admin_of(slug: str) -> User:
    return User.objects.get(email=f"admin@{slug}.example")


class Command(BaseCommand):
    help = "Load the demo facilities, people and a sample study (once), then print the logins."

    def handle(self, *args: Any, **options: Any) -> None:
        if not Facility.objects.filter(slug="krmc").exists():
            self._seed()
        if logins_file().exists():
            self.stdout.write(logins_file().read_text())

    def _seed_dicom(self) -> None:
        """Great Falls' PACS sends to the gateway and its studies go to Kalispell by a rule;
        Kalispell pushes into its own PACS."""
        gfc = Facility.objects.get(slug="gfc")
        krmc = Facility.objects.get(slug="krmc")
        # Gateway access is deny by default: the demo's PACS sends from this machine.
        gfc.gateway_calling_aes = "GFC_PACS"
        gfc.gateway_addresses = "127.0.0.1 ::1"
        gfc.save(update_fields=["gateway_calling_aes", "gateway_addresses"])
        krmc.gateway_calling_aes = "KRMC_PACS"
        krmc.gateway_addresses = "127.0.0.1 ::1"
        krmc.save(update_fields=["gateway_calling_aes", "gateway_addresses"])
        RoutingRule.objects.create(
            facility=gfc,
            created_by=_admin_of("gfc"),
            calling_ae="GFC_PACS",
            recipient_facility=krmc,
            can_download=True,
            can_import=True,
        )
        PacsDestination.objects.create(
            facility=krmc, name="KRMC PACS", ae_title="KRMC_PACS", host="127.0.0.1", port=4242
        )

    @transaction.atomic
    def _seed(self) -> None:
        lines = ["Demo logins (e-mail / password):"]
        operator_password = secrets.token_urlsafe(9)
        User.objects.create_superuser(
            email="operator@relay.example",
            password=operator_password,
            full_name="Platform Operator",
        )
        lines.append(f"  {'operator@relay.example':32} {operator_password}   staff (admin site)")
        first_sender = None
        for slug, name, city, ae_title, has_pacs in FACILITIES:
            facility = Facility.objects.create(
                slug=slug,
                name=name,
                city=city,
                ae_title=ae_title,
                has_pacs=has_pacs,
                listed=True,
                help_desk_phone=HELP_DESK_PHONES[slug],
            )
            for role in (Role.ADMIN, Role.SENDER, Role.READER):
                email = f"{role}@{slug}.example"
                password = secrets.token_urlsafe(9)
                user = User.objects.create_user(
                    email=email, password=password, full_name=f"{name} {role.label}"
                )
                Membership.objects.create(user=user, facility=facility, role=role)
                lines.append(f"  {email:32} {password}   {role.label.lower()} at {name}")
                if first_sender is None and role == Role.SENDER:
                    first_sender = (facility, user)
        assert first_sender is not None
        self._seed_dicom()
        facility, sender = first_sender
        samples = demo_ct_series() + [Path(str(get_testdata_file("MR_small.dcm"))).read_bytes()]
        for data in samples:
            result = instance_ingest(
                facility=facility, user=sender, chunks=[data], filename="demo.dcm", source="demo"
            )
            if result.status != "stored":
                self.stderr.write(f"demo study: {result.status} {result.reason}")
        # The demo studies arrived whole: no need to wait for the quiet period before sharing.
        Study.objects.filter(facility=facility).update(
            status=StudyStatus.COMPLETE, completed_at=timezone.now()
        )
        logins_file().parent.mkdir(parents=True, exist_ok=True)
        lines.append("")
        lines.append(
            f"DICOM: send to the gateway on {settings.DICOM_GATEWAY_BIND}:{settings.DICOM_GATEWAY_PORT}"
            " as Great Falls' PACS (calling AE GFC_PACS, called AE GFC_RELAY): the study is shared"
            " with Kalispell by a routing rule. Kalispell's PACS destination is KRMC_PACS at"
            " 127.0.0.1:4242 (an Orthanc on its default port)."
        )
        logins_file().write_text("\n".join(lines) + "\n")
        logins_file().chmod(0o600)
