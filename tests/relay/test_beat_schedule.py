"""`celery -A relay beat`, started as the README says, keeps its schedule file in the var folder,
not in whatever folder it was started from (issue 18: it wrote `celerybeat-schedule` into the
checkout, or into / under a service manager)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.server_process import ROOT


def test_beat_writes_its_schedule_into_the_var_folder(tmp_path: Path) -> None:
    started_in = tmp_path / "cwd"
    started_in.mkdir()
    var = tmp_path / "var"
    env = {
        **os.environ,
        "RELAY_VAR_DIR": str(var),
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "relay.settings",
    }
    for name in ("DATABASE_URL", "REDIS_URL"):
        env.pop(name, None)  # the embedded broker in the test's own var folder
    beat = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "celery", "-A", "relay", "beat", "--max-interval", "1"],
        cwd=started_in,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(var.glob("celerybeat-schedule*")):
            assert beat.poll() is None, beat.stdout.read().decode() if beat.stdout else ""
            assert time.monotonic() < deadline, "beat wrote no schedule in the var folder"
            time.sleep(0.2)
    finally:
        beat.send_signal(signal.SIGTERM)
        try:
            beat.wait(timeout=20)
        except subprocess.TimeoutExpired:
            beat.kill()
            beat.wait()
    assert list(started_in.iterdir()) == []
