"""Smoke test of the embedded default, as a new user would do it.

`make run` in a fresh var/ folder (SQLite, the SQLite broker, e-mail to a folder), then: sign in
as the demo sender, upload a folder with `relay send`, see the studies on the worklist, check
that the Celery worker sent an e-mail, press Ctrl-C, and check that every process stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
BASE = "http://127.0.0.1:8000"
FILES = ["CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "waveform_ecg.dcm", "SC_rgb_rle.dcm"]


def wait_for(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise SystemExit(f"smoke: timed out waiting for {what}")


def up() -> bool:
    try:
        return httpx.get(f"{BASE}/accounts/login/", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def main() -> int:
    var = Path(tempfile.mkdtemp(prefix="relay-smoke-"))
    env = {**os.environ, "RELAY_VAR_DIR": str(var)}
    log = (var / "make-run.log").open("wb")
    run = subprocess.Popen(
        ["make", "run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(up, 300, "the web server")
        output = lambda: (var / "make-run.log").read_text(errors="replace")  # noqa: E731
        match = wait_for(
            lambda: re.search(r"sender@krmc\.example\s+(\S+)", output()), 60, "the demo logins"
        )
        password = match.group(1)
        print("smoke: make run is up; demo logins printed")

        web = httpx.Client(base_url=BASE, timeout=30)
        web.get("/accounts/login/")
        response = web.post(
            "/accounts/login/",
            data={
                "login": "sender@krmc.example",
                "password": password,
                "csrfmiddlewaretoken": web.cookies["csrftoken"],
            },
            headers={"Referer": f"{BASE}/accounts/login/"},
        )
        assert response.status_code == 302 and response.headers["location"] == "/", response.text[
            :500
        ]
        print("smoke: signed in as the demo sender")

        token = subprocess.run(
            [
                str(ROOT / ".venv/bin/python"),
                "manage.py",
                "create_api_token",
                "sender@krmc.example",
            ],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        folder = var / "to-send"
        folder.mkdir()
        for name in FILES:
            shutil.copy(get_testdata_file(name), folder / name)
        (folder / "README.TXT").write_text("not an image")
        sent = subprocess.run(
            [
                str(ROOT / ".venv/bin/relay"),
                "send",
                str(folder),
                "--server",
                BASE,
                "--token",
                token,
                "--facility",
                "krmc",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        print(sent.stdout[-2000:], sent.stderr[-2000:])
        assert sent.returncode == 0, f"relay send exited {sent.returncode}"
        print("smoke: relay send uploaded the folder")

        worklist = web.get("/studies/", params={"sort": "received"}).text
        for name in ("CompressedSamples, CT1", "CompressedSamples, MR1"):
            assert name in worklist, f"{name} is not on the worklist"
        assert "DEMO, ANNA M" in web.get("/studies/", params={"q": "demo"}).text
        print("smoke: the studies are on the worklist")

        web.get("/accounts/password/reset/")
        web.post(
            "/accounts/password/reset/",
            data={"email": "sender@krmc.example", "csrfmiddlewaretoken": web.cookies["csrftoken"]},
            headers={"Referer": f"{BASE}/accounts/password/reset/"},
        )
        mail = var / "mail"
        wait_for(
            lambda: mail.exists() and any(mail.iterdir()),
            120,
            "the Celery worker to send the e-mail",
        )
        print("smoke: the Celery worker sent the password-reset e-mail")

        # The sharing flow on the demo data: Kalispell shares its CT with Great Falls Clinic.
        worklist = web.get("/studies/", params={"q": "demo"}).text
        study_uuid = re.search(r'href="/studies/([0-9a-f-]+)/"', worklist).group(1)
        share_page = web.get("/share/", params={"study": study_uuid, "to": "facility"})
        gfc = re.search(
            r'<option value="(\d+)"[^>]*>Great Falls Clinic</option>', share_page.text
        ).group(1)
        response = web.post(
            "/share/",
            data={
                "study": study_uuid,
                "kind": "facility",
                "recipient_facility": gfc,
                "message": "For the consult tomorrow.",
                "expires_on": (datetime.now(UTC).date() + timedelta(days=7)).isoformat(),
                "can_view": "on",
                "csrfmiddlewaretoken": web.cookies["csrftoken"],
            },
            headers={"Referer": f"{BASE}/share/"},
        )
        assert response.status_code == 302, response.text[:2000]
        share_path = response.headers["location"]

        def share_mail() -> str | None:
            for path in mail.iterdir():
                text = path.read_text(errors="replace")
                if "To: reader@gfc.example" in text and share_path in text:
                    return text
            return None

        text = wait_for(share_mail, 120, "the share e-mail to the Great Falls reader")
        assert "DEMO" not in text and "KRMC-100234" not in text, "patient data in the e-mail"
        print("smoke: the Great Falls reader got the share e-mail, without patient data")
        reader = httpx.Client(base_url=BASE, timeout=30)
        reader.get("/accounts/login/")
        reader_password = re.search(r"reader@gfc\.example\s+(\S+)", output()).group(1)
        reader.post(
            "/accounts/login/",
            data={
                "login": "reader@gfc.example",
                "password": reader_password,
                "csrfmiddlewaretoken": reader.cookies["csrftoken"],
            },
            headers={"Referer": f"{BASE}/accounts/login/"},
        )
        assert "DEMO, ANNA M" in reader.get("/inbox/").text
        assert reader.get(share_path).status_code == 200
        assert reader.get(f"/studies/{study_uuid}/").status_code == 200
        assert "reader@gfc.example" in web.get("/sent/").text
        print("smoke: the reader opened it and the sender's Sent page shows who did")

        # The DICOM gateway of make run: Great Falls' PACS (storescu) sends under GFC's title.
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientName = "GATEWAY^SMOKE"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        ds.save_as(var / "gateway.dcm", enforce_file_format=True)
        stored = subprocess.run(
            ["storescu", "-aet", "GFC_PACS", "-aec", "GFC_RELAY", "127.0.0.1", "11112",
             str(var / "gateway.dcm")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert stored.returncode == 0, stored.stdout + stored.stderr
        assert "GATEWAY, SMOKE" in reader.get("/studies/").text
        refused = subprocess.run(
            ["echoscu", "-aec", "NOBODY", "127.0.0.1", "11112"], capture_output=True, timeout=60
        )
        assert refused.returncode != 0, "the gateway let an unknown AE title in"
        print("smoke: the DICOM gateway stored a C-STORE from Great Falls' PACS")
    finally:
        # What Ctrl-C in the terminal does: SIGINT to the foreground process group.
        os.killpg(run.pid, signal.SIGINT)
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            print((var / "make-run.log").read_text(errors="replace")[-5000:])
            raise SystemExit("smoke: make run did not stop on Ctrl-C") from None
        log.close()
    leftovers = subprocess.run(
        ["pgrep", "-f", f"{ROOT}/.venv/bin/python.*(runserver|celery|dicom_gateway)"],
        capture_output=True,
        text=True,
    ).stdout
    leftovers += subprocess.run(
        ["pgrep", "-f", "celery -A relay"], capture_output=True, text=True
    ).stdout
    if leftovers.strip() or up():
        print((var / "make-run.log").read_text(errors="replace")[-5000:])
        raise SystemExit(f"smoke: processes left after Ctrl-C: {leftovers}")
    print("smoke: Ctrl-C stopped every process")
    shutil.rmtree(var, ignore_errors=True)
    print("smoke: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
