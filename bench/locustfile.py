"""The load test's users (locust), a regional network's day compressed (README: Load test).

bench/load.py seeds the network and starts locust with this file; RELAY_LOAD_DATA names the JSON
file of facilities, accounts, tokens and studies it made. Request names group what the README's
table reports: "page: ..." (HTML pages and the viewer's study data), "frame: ..." (rendered frames
and thumbnails, stored in the bucket), "api: ..." (uploads), "form: ..." (a share).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
from typing import Any

import pydicom
from locust import HttpUser, between, task
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

DATA: dict[str, Any] = json.loads(open(os.environ["RELAY_LOAD_DATA"]).read())  # noqa: SIM115
FRAMES_PER_VIEW = 20
CSRF = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
_TEMPLATE = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]


def _new_image(study: str, series: str, number: int) -> bytes:
    ds = _TEMPLATE.copy()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class _Member(HttpUser):
    abstract = True
    wait_time = between(1, 3)

    def on_start(self) -> None:
        self.client.verify = DATA["certificate"]
        self.facility = random.choice(DATA["facilities"])  # noqa: S311
        page = self.client.get("/accounts/login/", name="page: sign-in")
        token = CSRF.search(page.text)
        self.client.post(
            "/accounts/login/",
            data={
                "login": self.facility["email"],
                "password": DATA["password"],
                "csrfmiddlewaretoken": token.group(1) if token else "",
            },
            headers={"Referer": f"{self.host}/accounts/login/"},
            name="form: sign-in",
        )

    def study(self) -> dict[str, Any]:
        return dict(random.choice(self.facility["studies"]))  # noqa: S311


class Viewer(_Member):
    """A radiologist or physician reading: the viewer, its study data, the thumbnails, then
    scrolling through 20 frames."""

    weight = 6

    @task
    def read(self) -> None:
        base = f"/studies/{self.study()['uuid']}/view/"
        self.client.get(base, name="page: viewer")
        answer = self.client.get(base + "study.json", name="page: viewer study.json")
        if answer.status_code != 200:
            return
        data = answer.json()
        for series in data["series"]:
            self.client.get(series["thumbnail_url"], name="frame: thumbnail")
        instances = [i for series in data["series"] for i in series["instances"]]
        for instance in instances[:FRAMES_PER_VIEW]:
            self.client.get(
                data["frame_url"].replace("{sop}", instance["uid"]).replace("{frame}", "0"),
                name="frame: rendered",
            )


class Desk(_Member):
    """Front desk and technologists: the home page, worklist searches, a study's page."""

    weight = 3

    @task(3)
    def search(self) -> None:
        self.client.get(f"/studies/?q={self.facility['patient_prefix']}", name="page: worklist")

    @task(1)
    def home(self) -> None:
        self.client.get("/", name="page: home")

    @task(1)
    def study_page(self) -> None:
        self.client.get(f"/studies/{self.study()['uuid']}/", name="page: study")


class Sender(_Member):
    """A modality's uploader sending 10 images a time, and now and then a share."""

    weight = 1

    @task(5)
    def upload(self) -> None:
        study, series = generate_uid(), generate_uid()
        files = [
            ("file", (f"{n}.dcm", _new_image(study, series, n), "application/dicom"))
            for n in range(1, 11)
        ]
        self.client.post(
            f"/api/v1/instances?facility={self.facility['slug']}",
            files=files,
            headers={"Authorization": f"Bearer {self.facility['token']}"},
            name="api: upload 10 images",
        )

    @task(1)
    def share(self) -> None:
        study = self.study()["uuid"]
        path = f"/share/?study={study}"
        page = self.client.get(path, name="page: share form")
        token = CSRF.search(page.text)
        self.client.post(
            path,
            data={
                "study": [study],
                "kind": "facility",
                "recipient_facility": DATA["recipient_facility"],
                "expires_on": DATA["expires_on"],
                "can_view": "on",
                "csrfmiddlewaretoken": token.group(1) if token else "",
            },
            headers={"Referer": f"{self.host}{path}"},
            allow_redirects=False,
            name="form: share",
        )
