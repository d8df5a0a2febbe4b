"""A web worker that serves pages and API answers loads no pixel or DICOM code: pydicom (whose
own import loads numpy, Pillow and the pylibjpeg decoders), pynetdicom, numpy, Pillow, the JPEG
decoders, dicom-anonymizer's tables and the QR code maker are imported only where pixels, files,
associations or QR codes are made, so an idle worker stays small (README: Memory of a web
worker).

The check runs in fresh interpreters sharing one var folder. The first stores a CT image through
the upload API and views its first frame (which makes the stored render); the second is the web
worker: Django is set up and the test client asks for the home page, the sign-in page, the
facilities API (with a token), the study list, a study page and the frame (served from the
stored render); then the interpreter says which modules it holds and its peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

SETUP = r"""
from relay.embedded import var_prepare

var_prepare()
import django

django.setup()
from django.core.management import call_command

call_command("migrate", verbosity=0)
"""

PREPARE = (
    SETUP
    + r"""
import json

from django.test.utils import setup_test_environment

setup_test_environment()  # the test client's host is allowed
from django.test import Client
from django.urls import reverse
from pydicom.data import get_testdata_file

from portal.models import ApiToken, Facility, Membership, Role, User
from transfers.models import Instance

facility = Facility.objects.create(name="Lean Hospital", slug="lean")
user = User.objects.create_user(email="lean@example.org", password="a long passphrase 1")
Membership.objects.create(user=user, facility=facility, role=Role.SENDER)
raw = ApiToken.issue(user=user, name="lean")[1]
with open(get_testdata_file("CT_small.dcm"), "rb") as f:
    stored = Client().post(
        "/api/v1/instances?facility=lean",
        data=f.read(),
        content_type="application/dicom",
        HTTP_AUTHORIZATION=f"Bearer {raw}",
    )
assert stored.status_code == 201, stored.content
instance = Instance.objects.select_related("series__study").get()
study = instance.series.study
frame = reverse(
    "viewer_frame",
    kwargs={"study_uuid": study.uuid, "sop_uid": instance.sop_instance_uid, "frame": 0},
)
signed_in = Client()
signed_in.force_login(user)
assert signed_in.get(frame).status_code == 200  # renders and stores the frame
print(json.dumps({"token": raw, "study": f"/studies/{study.uuid}/", "frame": frame}))
"""
)

SERVE = (
    SETUP
    + r"""
import json, resource, sys

from django.test.utils import setup_test_environment

setup_test_environment()
from django.test import Client
from django.urls import resolve

from portal.models import User

given = json.loads(sys.argv[1])
user = User.objects.get(email="lean@example.org")
anonymous = Client()
statuses = {}
for url in ("/", "/accounts/login/"):
    resolve(url)
    statuses[url] = anonymous.get(url).status_code
api = Client(HTTP_AUTHORIZATION=f"Bearer {given['token']}")
statuses["/api/v1/facilities"] = api.get("/api/v1/facilities").status_code
signed_in = Client()
signed_in.force_login(user)
for url in ("/studies/", given["study"], given["frame"]):
    resolve(url)
    statuses[url] = signed_in.get(url).status_code
from relay.celery import app

print(json.dumps({
    "statuses": statuses,
    "tasks": sorted(name for name in app.tasks if not name.startswith("celery.")),
    "modules": sorted(sys.modules),
    "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
}))
"""
)

# Every module that loads pixel, DICOM or network code of its own (with their submodules).
PIXEL = (
    "pydicom",
    "pynetdicom",
    "numpy",
    "PIL",
    "pylibjpeg",
    "libjpeg",
    "openjpeg",
    "rle",
    "dicomanonymizer",
)


def _run(script: str, env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    var = tmp_path_factory.mktemp("lean") / "var"
    drop = ("SECRET_KEY", "REDIS_URL", "DATABASE_URL")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(RELAY_VAR_DIR=str(var), DJANGO_SETTINGS_MODULE="relay.settings")
    given = _run(PREPARE, env)
    answer = _run(SERVE, env, json.dumps(given))
    answer["given"] = given
    print(f"hot pages served; peak RSS {answer['maxrss_mib']} MiB")
    return answer


def _loaded(worker: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    return [
        m for m in worker["modules"] if m in names or m.startswith(tuple(f"{n}." for n in names))
    ]


def test_it_serves_the_hot_pages(worker: dict[str, Any]) -> None:
    statuses = worker["statuses"]
    given = worker["given"]
    assert statuses["/accounts/login/"] == 200
    assert statuses["/api/v1/facilities"] == 200
    assert statuses["/studies/"] == 200
    assert statuses[given["study"]] == 200
    assert statuses[given["frame"]] == 200


def test_it_loads_no_qr_or_font_code_for_hot_pages(worker: dict[str, Any]) -> None:
    assert _loaded(worker, ("segno", "PIL.ImageFont", "PIL.ImageDraw", "PIL.PngImagePlugin")) == []


def test_it_loads_no_pixel_dicom_or_network_code_for_hot_pages(worker: dict[str, Any]) -> None:
    assert _loaded(worker, PIXEL) == []


def test_it_still_registers_every_task(worker: dict[str, Any]) -> None:
    """The task modules import their services when they run, not when they are registered: a
    worker (and every web process that queues by name) still knows each task."""
    tasks = set(worker["tasks"])
    assert {
        "transfers.tasks.studies_complete_quiet",
        "transfers.tasks.purge_expired",
        "transfers.tasks.storage_verify_task",
        "transfers.dicom.tasks.push_run",
        "transfers.deidentify.tasks.deidentified_copy_make",
        "transfers.media.tasks.media_build_task",
        "transfers.reconcile.tasks.study_reconcile_task",
        "transfers.viewer.tasks.study_render_task",
        "transfers.sharing.tasks.shares_expire",
    } <= tasks


def test_the_constants_written_out_match_pydicoms() -> None:
    """Modules that no longer import pydicom at load time spell out a few of its constants."""
    import numpy as np
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )
    from pydicom.valuerep import VR

    from transfers import dicomio
    from transfers.dicom import convert, push
    from transfers.dicomweb import retrieve
    from transfers.viewer.render import value_itemsize

    assert dicomio.KNOWN_VRS == {vr.value.encode("ascii") for vr in VR if len(vr.value) == 2}
    assert dicomio.DEFLATED == DeflatedExplicitVRLittleEndian
    little = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert list(convert.LITTLE_ENDIAN) == push.UNCOMPRESSED == little
    assert retrieve.LITTLE_ENDIAN == {*little, DeflatedExplicitVRLittleEndian}
    for dtype in ("uint8", "int16", "uint16", "int32", "float32", "float64", "bool"):
        assert value_itemsize(dtype) == np.dtype(dtype).itemsize
