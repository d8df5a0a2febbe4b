"""A partly failed `relay send` never gets its study called complete (issue 13, finding 8).

The uploader announces every file before it uploads any; the study waits for all of them, so
that neither the manifest of a run in which 15 of 20 files failed nor the quiet period after a
killed run completes it and tells its recipients. A next run sends the rest; the sender may
also complete it without them on the study page.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import dicom_bytes, upload
from tests.relay_client import test_relay_send as base
from tests.relay_client.test_relay_send import relay_send, summary
from transfers.completion import expected_outstanding, studies_complete_quiet
from transfers.models import ExpectedInstance, NotifyStatus, Share, Study, StudyStatus
from transfers.sharing.services import share_create

# The live-server fixtures of the `relay send` tests: a proxy that fails uploads, and no
# RELAY_TOKEN / RELAY_SERVER from the developer's environment.
start_proxy = base.start_proxy
_no_relay_environment = base._no_relay_environment

pytestmark = pytest.mark.django_db(transaction=True)  # the live server sees only committed rows

STUDY_UID = "1.2.826.0.1.3680043.13.8"


@pytest.fixture
def twenty_files(tmp_path: Path) -> Path:
    folder = tmp_path / "cd"
    folder.mkdir()
    for n in range(1, 21):
        data = dicom_bytes("CT_small.dcm", StudyInstanceUID=STUDY_UID, InstanceNumber=n)
        (folder / f"IM{n:03d}.dcm").write_bytes(data)
    return folder


def test_a_send_with_15_of_20_files_failed_leaves_the_study_receiving(
    start_proxy, client, bob, bob_token, gfc, charlie, twenty_files, mailoutbox, settings, capsys
):
    # The study exists and is shared before the send, so the share waits for it to complete.
    first = sorted(twenty_files.iterdir())[0]
    assert upload(client, first.read_bytes(), token=bob_token).status_code == 201
    study = Study.objects.get()
    share, _ = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=gfc,
    )
    assert share.notify_status == NotifyStatus.WAITING

    # After four uploads the image store fails: it answers 503 to the next 15, and the run,
    # with no retries allowed, stops (exit code 3: the server is unavailable).
    proxy = start_proxy(succeed_first=4, failures=15)
    code, out, err = relay_send(
        capsys, str(twenty_files), "--server", proxy.url, "--token", bob_token,
        "--jobs", "1", "--retries", "0",
    )  # fmt: skip
    assert code == 3, out + err
    assert summary(out)["not sent"] == 15
    assert summary(out)["stored"] == 4
    assert summary(out)["already on server"] == 1
    assert "The run stopped before 15 files went; their studies wait for them." in out
    assert "The image store is unavailable" in err
    study.refresh_from_db()
    assert (study.status, study.num_instances) == (StudyStatus.RECEIVING, 5)
    # No manifest came (the run stopped): the announcement alone keeps the study waiting.
    assert expected_outstanding().count() == 15
    assert mailoutbox == []

    # Long past the quiet period: still waiting for the 15 announced images.
    settings.RELAY_STUDY_QUIET_SECONDS = 0
    assert studies_complete_quiet() == 0
    study.refresh_from_db()
    assert study.status == StudyStatus.RECEIVING
    assert mailoutbox == []

    # The image store is back; the same command again sends the rest: complete, and the
    # recipients are told once.
    proxy.failures = 0
    code, out, err = relay_send(
        capsys, str(twenty_files), "--server", proxy.url, "--token", bob_token
    )
    assert code == 0, out + err
    assert summary(out)["stored"] == 15
    assert summary(out)["complete studies"] == 1
    study.refresh_from_db()
    assert (study.status, study.num_instances) == (StudyStatus.COMPLETE, 20)
    assert ExpectedInstance.objects.count() == 0
    assert [m.to for m in mailoutbox] == [["charlie@gfc.example"]]
    assert Share.objects.get().notify_status == NotifyStatus.SENT
    studies_complete_quiet()
    assert len(mailoutbox) == 1


def test_a_file_the_server_rejects_is_withdrawn_and_the_rest_completes(
    live_server, bob_token, tmp_path, capsys
):
    folder = tmp_path / "cd"
    folder.mkdir()
    for n in (1, 2):
        data = dicom_bytes("CT_small.dcm", StudyInstanceUID=STUDY_UID, InstanceNumber=n)
        (folder / f"IM{n}.dcm").write_bytes(data)
    # Announced (its header is intact) but refused by the server: cut short, a CD read error.
    cut = dicom_bytes("CT_small.dcm", StudyInstanceUID=STUDY_UID, InstanceNumber=3)
    (folder / "IM3.dcm").write_bytes(cut[:-2000])
    code, out, err = relay_send(
        capsys, str(folder), "--server", live_server.url, "--token", bob_token
    )
    assert code == 1, out + err
    counts = summary(out)
    assert (counts["stored"], counts["rejected"], counts["complete studies"]) == (2, 1, 1)
    assert Study.objects.get().status == StudyStatus.COMPLETE
    assert ExpectedInstance.objects.count() == 0
