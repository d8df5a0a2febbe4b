"""Smoke test of the embedded default, as a new user would do it.

`make run` in a fresh var/ folder (SQLite, file broker, e-mail to a folder), then: sign in as the
demo sender, upload a folder with `relay send`, see the studies on the worklist, check that the
Celery worker sent an e-mail, press Ctrl-C, and check that every process stopped.
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
from pathlib import Path

import httpx
from pydicom.data import get_testdata_file

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
                "username": "sender@krmc.example",
                "password": password,
                "csrfmiddlewaretoken": web.cookies["csrftoken"],
            },
            headers={"Referer": f"{BASE}/accounts/login/"},
        )
        assert response.status_code == 302 and response.headers["location"] == "/studies/", (
            response.text[:500]
        )
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
        ["pgrep", "-f", f"{ROOT}/.venv/bin/python.*(runserver|celery)"],
        capture_output=True,
        text=True,
    ).stdout
    leftovers += subprocess.run(
        ["pgrep", "-f", "celery -A portal"], capture_output=True, text=True
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
