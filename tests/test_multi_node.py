"""Relay as several nodes (issue 18): nginx with TLS in front of two web nodes, a main and a
render worker node, beat and the DICOM gateway, sharing only PostgreSQL, the broker (Redis, or
RabbitMQ) and an S3 bucket (moto's server); every node started from the production guide's own
files (tests/cluster.py). Through it a study goes the whole way: `relay send` through the
balancer, rendered on the render node, a share e-mail, the viewer, ZIP, disc image and a push
with either web node stopped, a C-STORE through the gateway, the monthly invoice, the purge; and
nothing a node keeps on its own disk is needed by another or after a restart.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.utils import timezone
from pydicom.uid import generate_uid

from tests.cluster import BIN, ROOT, Cluster, cluster_running, free_port
from tests.helpers import dicom_bytes, peer_missing, require_peer, require_postgresql
from tests.server_process import database_url_of_this_run

pytestmark = [pytest.mark.peer, pytest.mark.slow, pytest.mark.django_db]

PASSWORD = "cluster horse battery staple 42"
SLICES = 6


def _wait(check: Callable[[], Any], seconds: float, what: str, cluster: Cluster) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what}\n{cluster.logs()}")


def _rabbitmq_up() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


SETUP = """
import json
from portal.models import ApiToken, Facility, Membership, User
from transfers.models import PacsDestination
krmc = Facility.objects.create(
    name="Kalispell Regional", slug="krmc", ae_title="KRMC",
    gateway_calling_aes="STORESCU", gateway_addresses="127.0.0.1",
)
gfc = Facility.objects.create(name="Great Falls Clinic", slug="gfc", listed=True)
alice = User.objects.create_user(email="alice@krmc.example", password=PASSWORD)
charlie = User.objects.create_user(email="charlie@gfc.example", password=PASSWORD)
Membership.objects.create(user=alice, facility=krmc, role="sender")
Membership.objects.create(user=charlie, facility=gfc, role="reader")
pacs = PacsDestination.objects.create(
    facility=gfc, name="GFC PACS", ae_title="GFCPACS", host="127.0.0.1", port=PACS_PORT
)
_, token = ApiToken.issue(user=alice, name="cluster")
print("CLUSTER " + json.dumps({"token": token, "gfc": gfc.pk, "pacs": str(pacs.uuid)}))
"""


class World:
    """The running cluster and what the tests made in it."""

    def __init__(self, cluster: Cluster, setup: dict[str, Any], pacs: Path) -> None:
        self.cluster = cluster
        self.setup = setup
        self.pacs = pacs  # storescp's folder: what the push delivered

    def client(self, email: str) -> httpx.Client:
        """A browser-like client signed in through the balancer (TLS, secure cookies)."""
        client = httpx.Client(
            base_url=self.cluster.url,
            verify=self.cluster.tls(),
            timeout=120,
            follow_redirects=False,
        )
        page = client.get("/accounts/login/")
        assert page.status_code == 200, page.text[:500]
        answer = client.post(
            "/accounts/login/",
            data={"login": email, "password": PASSWORD, "csrfmiddlewaretoken": _csrf(page.text)},
            headers={"Referer": f"{self.cluster.url}/accounts/login/"},
        )
        assert answer.status_code == 302, answer.text[:500]
        return client

    def post(
        self, client: httpx.Client, path: str, data: dict[str, Any], *, form: str = ""
    ) -> httpx.Response:
        """A form's POST, with the CSRF token from the page that shows the form (`form`,
        by default the same path)."""
        page = client.get(form or path)
        assert page.status_code == 200, (form or path, page.status_code)
        return client.post(
            path,
            data={**data, "csrfmiddlewaretoken": _csrf(page.text)},
            headers={"Referer": f"{self.cluster.url}{path}"},
        )

    def shell(self, node: str, code: str) -> Any:
        out = self.cluster.manage(node, "shell", "-c", code)
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
        return json.loads(line.removeprefix("RESULT "))


def _csrf(html: str) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    assert match is not None, html[:500]
    return match.group(1)


BROKERS = ["redis", "rabbitmq"]


@pytest.fixture(scope="module", params=BROKERS)
def world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    django_db_setup: None,
    django_db_blocker: Any,
) -> Iterator[World]:
    for program in ("nginx", "storescp", "storescu", "openssl", "psql", "rabbitmqctl"):
        require_peer(program)
    with django_db_blocker.unblock():
        require_postgresql("the nodes share one PostgreSQL database, as production's do")
        server_url = database_url_of_this_run()
    if request.param == "rabbitmq" and not _rabbitmq_up():
        peer_missing("RabbitMQ is not running on 127.0.0.1:5672")
    tmp = tmp_path_factory.mktemp(f"cluster-{request.param}")
    pacs_port = free_port()
    pacs = tmp / "pacs"
    pacs.mkdir()
    storescp = subprocess.Popen(  # noqa: S603
        ["storescp", "-aet", "GFCPACS", "-od", str(pacs), str(pacs_port)],  # noqa: S607
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    redis_db = 13 if request.param == "redis" else 14
    try:
        with cluster_running(
            tmp / "nodes",
            database_server_url=server_url,
            broker=request.param,
            redis_db=redis_db,
        ) as cluster:
            # The guide's first production step, then what an admin does in the admin site.
            env_password = {"RELAY_BOOTSTRAP_PASSWORD": PASSWORD}
            subprocess.run(  # noqa: S603
                [
                    str(BIN / "python"),
                    "manage.py",
                    "bootstrap",
                    "--email",
                    "it@krmc.example",
                    "--facility",
                    "Relay Operations",
                ],
                cwd=ROOT,
                env={**cluster.env("web-a"), **env_password},
                check=True,
                capture_output=True,
            )
            code = SETUP.replace("PASSWORD", repr(PASSWORD)).replace("PACS_PORT", str(pacs_port))
            out = cluster.manage("web-a", "shell", "-c", code)
            line = next(ln for ln in out.splitlines() if ln.startswith("CLUSTER "))
            yield World(cluster, json.loads(line.removeprefix("CLUSTER ")), pacs)
    finally:
        storescp.kill()
        storescp.wait()


def _series_folder(folder: Path, *, patient: str, count: int = SLICES) -> str:
    """`count` CT slices of one new study in `folder`; the Study Instance UID."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for number in range(1, count + 1):
        (folder / f"{number:03}.dcm").write_bytes(
            dicom_bytes(
                "CT_small.dcm",
                StudyInstanceUID=study,
                SeriesInstanceUID=series,
                InstanceNumber=number,
                PatientName=patient,
                PatientID=f"ID-{patient[:6]}",
            )
        )
    return study


def _relay_send(world: World, folder: Path) -> None:
    """The desktop uploader, through the balancer, trusting the proxy's certificate."""
    cluster = world.cluster
    done = subprocess.run(  # noqa: S603
        [
            str(BIN / "relay"),
            "send",
            str(folder),
            "--server",
            cluster.url,
            "--token",
            world.setup["token"],
            "--facility",
            "krmc",
        ],
        env={**os.environ, "SSL_CERT_FILE": str(cluster.certificate)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _study_uuid(world: World, study_uid: str) -> str:
    code = (
        "from transfers.models import Study; import json; "
        f"s = Study.objects.get(study_instance_uid={study_uid!r}); "
        "print('RESULT ' + json.dumps([str(s.uuid), s.status]))"
    )
    uuid, _ = world.shell("web-b", code)
    return str(uuid)


def _share_to_gfc(world: World, study_uuid: str) -> str:
    alice = world.client("alice@krmc.example")
    answer = world.post(
        alice,
        f"/share/?study={study_uuid}",
        {
            "study": [study_uuid],
            "kind": "facility",
            "recipient_facility": world.setup["gfc"],
            "expires_on": (timezone.localdate() + timedelta(days=7)).isoformat(),
            "can_view": "on",
            "can_download": "on",
            "can_import": "on",
        },
    )
    errors = re.findall(r'class="[^"]*error[^"]*"[^>]*>([^<]+)', answer.text)
    assert answer.status_code == 302, errors
    return str(answer.headers["location"])


def test_a_study_goes_the_whole_way_across_the_nodes_with_either_web_node_down(
    world: World, tmp_path: Path
) -> None:
    cluster = world.cluster
    # Each web node is ready, asked by its own address as a balancer would: the shared
    # database, the bucket, the cache, the broker (Redis or RabbitMQ) and the gateway answer.
    for node, port in cluster.web_ports.items():
        ready = httpx.get(f"http://127.0.0.1:{port}/health/ready/", timeout=30)
        assert ready.status_code == 200, (node, ready.text)
        assert {"Database", "Storage", "Cache", "Broker", "Gateway"} <= {
            name.split("(")[0].strip() for name in ready.json()
        }, ready.json()

    study_uid = _series_folder(tmp_path / "ct", patient="Nodes^Anna")
    _relay_send(world, tmp_path / "ct")
    study_uuid = _study_uuid(world, study_uid)

    # Both web nodes took part of the upload: the balancer spread it.
    uploads = {node for method, path, node in cluster.served_by() if path == "/api/v1/instances"}
    assert uploads == {"web-a", "web-b"}, cluster.served_by()

    # The study completed on the manifest and the render node rendered every frame into the
    # bucket; the main worker rendered nothing.
    _wait(
        lambda: len(cluster.bucket_keys("renders/")) >= SLICES,
        120,
        "the render node did not render the study into the bucket",
        cluster,
    )
    ran = re.compile(r"Task transfers\.viewer\.tasks\.\w+\[[0-9a-f-]+\] succeeded")
    _wait(
        lambda: ran.search(cluster.processes["worker-b"].log.read_text()),
        60,
        "the render node did not finish the render task",
        cluster,
    )
    assert not ran.search(cluster.processes["worker-a"].log.read_text())

    # Alice shares it; the main worker e-mails Charlie a link to the share.
    inbox_before = len(cluster.inbox.messages)
    _share_to_gfc(world, study_uuid)
    message = _wait(
        lambda: [
            m for m in cluster.inbox.messages[inbox_before:] if m["To"] == "charlie@gfc.example"
        ],
        60,
        "no share e-mail reached Charlie",
        cluster,
    )[0]
    body = message.get_body(("plain",)).get_content()
    assert "Nodes" not in body + message["Subject"]  # no patient name in e-mail
    link = re.search(re.escape(cluster.url) + r"(/shares/[0-9a-f-]+/)", body)
    assert link is not None, body

    # With web node A stopped, Charlie does everything through node B...
    cluster.stop("web-a")
    charlie = world.client("charlie@gfc.example")
    assert charlie.get(link.group(1)).status_code == 200
    _receive_everything(world, charlie, study_uuid)
    # ...and with A back and B stopped, through node A, on the session B gave him.
    # (A rolling restart, as the guide says: the next node stops only once the balancer sends
    # requests to the one that came back; nginx retries a failed node after fail_timeout.)
    cluster.web_start("web-a")
    _wait(lambda: _balanced_to(world, "web-a"), 30, "the balancer never took web-a back", cluster)
    cluster.stop("web-b")
    _view(charlie, study_uuid)
    cluster.web_start("web-b")
    _wait(lambda: _balanced_to(world, "web-b"), 30, "the balancer never took web-b back", cluster)


def _balanced_to(world: World, node: str) -> bool:
    with httpx.Client(base_url=world.cluster.url, verify=world.cluster.tls()) as client:
        client.get("/health/live/")
    return world.cluster.served_by()[-1][2] == node


def _view(client: httpx.Client, study_uuid: str) -> None:
    """The viewer, its study data, a frame and a thumbnail, as a browser would ask."""
    base = f"/studies/{study_uuid}/view/"
    assert client.get(base).status_code == 200
    study = client.get(base + "study.json").json()
    instances = [i for series in study["series"] for i in series["instances"]]
    assert len(instances) == SLICES
    frame = client.get(base + f"frames/{instances[0]['uid']}/0/")
    assert frame.status_code == 200 and len(frame.content) > 1000, frame.status_code
    thumbnail = client.get(study["series"][0]["thumbnail_url"])
    assert thumbnail.status_code == 200 and thumbnail.content[:4] == b"\x89PNG"


def _receive_everything(world: World, charlie: httpx.Client, study_uuid: str) -> None:
    cluster = world.cluster
    _view(charlie, study_uuid)

    # The ZIP: every slice, byte for byte a DICOM file.
    answer = charlie.get(f"/studies/{study_uuid}/download/")
    assert answer.status_code == 200, answer.status_code
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        images = [name for name in archive.namelist() if "/IM" in name]
        assert all(archive.read(name)[128:132] == b"DICM" for name in images)
        assert "DICOMDIR" in archive.namelist()
    assert len(images) == SLICES

    # The disc image, built by the main worker into the bucket, downloaded through node B.
    answer = world.post(charlie, f"/studies/{study_uuid}/cd/", {}, form=f"/studies/{study_uuid}/")
    assert answer.status_code == 302, answer.status_code
    export_page = str(answer.headers["location"])

    def disc_link() -> str | None:
        page = charlie.get(export_page).text
        found = re.search(r'href="(/studies/[^"]+/cd/[^"]+/download/)"', page)
        return found.group(1) if found else None

    iso_url = _wait(disc_link, 120, "the disc image was not built", cluster)
    iso = charlie.get(iso_url)
    assert iso.status_code == 200 and iso.content[0x8001:0x8006] == b"CD001"

    # The push into Great Falls' PACS, sent by the main worker.
    answer = world.post(
        charlie,
        f"/studies/{study_uuid}/pacs/",
        {"action": "push", "destination": world.setup["pacs"]},
    )
    assert answer.status_code == 302, answer.text[:500]
    _wait(
        lambda: len([p for p in world.pacs.iterdir() if p.is_file()]) >= SLICES,
        120,
        "the push did not deliver the study",
        cluster,
    )


def _gateway_send(world: World, folder: Path) -> None:
    cluster = world.cluster
    files = sorted(str(path) for path in folder.iterdir())
    done = subprocess.run(  # noqa: S603
        [
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            "KRMC",
            "127.0.0.1",  # noqa: S607
            str(cluster.gateway_port),
            *files,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_c_store_is_pushed_invoiced_once_and_purged_across_the_nodes(
    world: World, tmp_path: Path
) -> None:
    cluster = world.cluster
    study_uid = _series_folder(tmp_path / "ct", patient="Gateway^Ben", count=3)
    _gateway_send(world, tmp_path / "ct")
    # Beat completes quiet studies every minute; the operator's `celery call` does it now.
    cluster.celery("worker-a", "call", "transfers.tasks.studies_complete_quiet")
    _wait(
        lambda: (
            world.shell(
                "web-a",
                "import json; from transfers.models import Study; "
                f"print('RESULT ' + json.dumps(Study.objects.get(study_instance_uid={study_uid!r})"
                ".status))",
            )
            == "complete"
        ),
        60,
        "the gateway's study never completed",
        cluster,
    )
    study_uuid = _study_uuid(world, study_uid)
    alice = world.client("alice@krmc.example")
    assert "Gateway" in alice.get("/studies/").text

    _share_to_gfc(world, study_uuid)
    charlie = world.client("charlie@gfc.example")
    before = len([p for p in world.pacs.iterdir() if p.is_file()])
    answer = world.post(
        charlie,
        f"/studies/{study_uuid}/pacs/",
        {"action": "push", "destination": world.setup["pacs"]},
    )
    assert answer.status_code == 302
    _wait(
        lambda: len([p for p in world.pacs.iterdir() if p.is_file()]) >= before + 3,
        120,
        "the push did not deliver the gateway's study",
        cluster,
    )
    usage = (
        "import json; from billing.models import UsageRecord; from transfers.models import Push; "
        f"push = Push.objects.filter(study__study_instance_uid={study_uid!r}).get(); "
        "print('RESULT ' + json.dumps([push.pk, push.status, "
        "UsageRecord.objects.filter(kind='push', facility__slug='gfc').count()]))"
    )
    push_id, status, pushes_metered = _wait(
        lambda: (lambda r: r if r[1] == "done" else None)(world.shell("web-b", usage)),
        60,
        "the push never finished",
        cluster,
    )
    # The push task delivered again, as a broker does when the worker that ran it was lost
    # before acknowledging: it finds the push done, sends nothing and meters nothing again.
    cluster.celery("worker-a", "call", "transfers.dicom.tasks.push_run", "--args", f"[{push_id}]")
    _wait(
        lambda: (
            len(
                re.findall(
                    r"Task transfers\.dicom\.tasks\.push_run\[[0-9a-f-]+\] succeeded",
                    cluster.processes["worker-a"].log.read_text(),
                )
            )
            >= 2
        ),
        60,
        "the redelivered push task did not run",
        cluster,
    )
    assert pushes_metered >= 1  # Great Falls, the receiving facility, pays for its pushes
    assert world.shell("web-b", usage) == [push_id, "done", pushes_metered]

    # The month's invoices, issued from the worker node, once: Great Falls owes.
    month = timezone.localdate().strftime("%Y-%m")
    cluster.manage("worker-a", "invoice_month", month, "--allow-open-month")
    invoices = (
        "import json; from billing.models import Invoice, UsageRecord; "
        "i = Invoice.objects.filter(facility__slug='gfc').values_list('records', flat=True); "
        "print('RESULT ' + json.dumps([list(i), "
        "UsageRecord.objects.filter(facility__slug='gfc').count()]))"
    )
    (records,), metered = world.shell("worker-a", invoices)
    assert records == metered >= 2  # at least the push and the views
    cluster.manage("worker-a", "invoice_month", month, "--allow-open-month", check=False)
    assert world.shell("worker-a", invoices) == [[records], metered]

    # The purge, once the share has lapsed and the retention period has passed: the images
    # leave the bucket, whichever node stored them, and the viewer answers that they are gone.
    keys = world.shell(
        "web-a",
        "import json; from datetime import timedelta; from django.utils import timezone; "
        "from transfers.models import Instance, Share, Study; "
        f"s = Study.objects.get(study_instance_uid={study_uid!r}); "
        "Share.objects.filter(studies=s).update(expires_at=timezone.now() - timedelta(days=1)); "
        "Study.objects.filter(pk=s.pk).update("
        "last_received_at=timezone.now() - timedelta(days=s.facility.retention_days + 1)); "
        "print('RESULT ' + json.dumps(list(Instance.objects.filter(series__study=s)"
        ".values_list('storage_key', flat=True))))",
    )
    assert len(keys) == 3 and set(keys) <= set(cluster.bucket_keys())
    cluster.manage("worker-a", "purge_expired")
    assert not set(keys) & set(cluster.bucket_keys())
    assert alice.get(f"/studies/{study_uuid}/view/study.json").status_code in (404, 410)


def test_what_a_node_keeps_on_its_own_disk_is_safe_to_lose(world: World) -> None:
    """No image, render, disc image or spool stays on a node's own disk: after everything
    above, each node's working folder holds only files every node makes for itself (static
    files, beat's schedule, gunicorn's control socket), and a web node whose folder is wiped
    comes back and serves the same study."""
    cluster = world.cluster
    # Prometheus' per-process counters (metrics/) are emptied when the node starts.
    allowed = re.compile(r"^(static/.*|celerybeat-schedule.*|gunicorn\.ctl|metrics/[\w.-]+\.db)$")
    for node in ("web-a", "web-b", "worker-a", "worker-b", "beat", "gateway"):
        var = cluster.var(node)
        kept = [str(path.relative_to(var)) for path in var.rglob("*") if path.is_file()]
        assert [name for name in kept if not allowed.match(name)] == [], node
        for path in (cluster.tmp / node).rglob("*"):
            if path.is_file() and path.suffix != ".log":
                with path.open("rb") as data:
                    assert data.read(132)[128:] != b"DICM", path

    study_uuid = world.shell(
        "web-a",
        "import json; from transfers.models import Study; "
        "print('RESULT ' + json.dumps(str(Study.objects.filter(purged_at__isnull=True)"
        ".earliest('id').uuid)))",
    )
    cluster.stop("web-b")
    shutil.rmtree(cluster.var("web-b"))
    cluster.stop("web-a")
    cluster.web_start("web-b")
    _view(world.client("charlie@gfc.example"), study_uuid)
    cluster.web_start("web-a")
