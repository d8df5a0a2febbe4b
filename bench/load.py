"""The load test of a regional network (issue 18; README: Load test), in `make bench`.

The set-up is the multi-node test's (tests/cluster.py: nginx with TLS, gunicorn web nodes, main
and render workers, beat, the gateway, PostgreSQL, Redis, images in a bucket on moto's S3 server),
run twice: with one web node and with two behind the balancer. Each is seeded with 30 facilities,
each with an account and an API token and two studies of 20 CT images uploaded through the API
and rendered by the render worker; then locust (bench/locustfile.py) runs closed-loop users, each
waiting 1 to 3 s between actions: 60 % viewers (the viewer, its study data, the thumbnails and 20
frames), 30 % desk users (worklist searches, the home page, a study's page), 10 % senders (10
images per upload, now and then a share with its e-mail). Each step is bounded in time
(`--seconds`) and stops by itself; everything listens on loopback only.

    .venv/bin/python bench/load.py [--users 10,25,50] [--seconds 40] [--nodes 1,2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.cluster import BIN, Cluster, cluster_running  # noqa: E402

FACILITIES = 30
STUDIES_PER_FACILITY = 2
IMAGES_PER_STUDY = 20
PASSWORD = "load horse battery staple 42"  # noqa: S105 - a seeded account on loopback
PAGE_AIM_MS, FRAME_AIM_MS = 300, 100

SEED = """
import json
from portal.models import ApiToken, Facility, Membership, User
out = []
for n in range(FACILITIES):
    facility = Facility.objects.create(name=f"Facility {n:02}", slug=f"f{n:02}", listed=True)
    user = User.objects.create_user(email=f"tech{n:02}@f{n:02}.example", password=PASSWORD)
    Membership.objects.create(user=user, facility=facility, role="sender")
    _, token = ApiToken.issue(user=user, name="load")
    out.append({"slug": facility.slug, "email": user.email, "token": token})
hub = Facility.objects.create(name="Regional Hub", slug="hub", listed=True)
print("LOAD " + json.dumps({"facilities": out, "recipient_facility": hub.pk}))
"""


def _image(study: str, series: str, number: int, patient: str) -> bytes:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    ds.PatientName = patient
    ds.PatientID = f"ID-{patient[:8]}"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def seed(cluster: Cluster, folder: Path) -> Path:
    """The network's accounts and studies, uploaded through the balancer and rendered; the JSON
    file locust reads."""
    from pydicom.uid import generate_uid

    code = SEED.replace("FACILITIES", str(FACILITIES)).replace("PASSWORD", repr(PASSWORD))
    out = cluster.manage("web-a", "shell", "-c", code)
    made = json.loads(next(ln for ln in out.splitlines() if ln.startswith("LOAD "))[5:])

    jobs = []
    for n, facility in enumerate(made["facilities"]):
        facility["patient_prefix"] = f"Load{n:02}"
        facility["study_uids"] = []
        for s in range(STUDIES_PER_FACILITY):
            study, series = generate_uid(), generate_uid()
            facility["study_uids"].append(study)
            patient = f"Load{n:02}^Patient{s}"
            for start in range(1, IMAGES_PER_STUDY + 1, 10):
                numbers = range(start, min(start + 10, IMAGES_PER_STUDY + 1))
                jobs.append((facility, [(study, series, i, patient) for i in numbers]))

    def upload(job: tuple[dict[str, Any], list[tuple[str, str, int, str]]]) -> None:
        facility, images = job
        files = [
            ("file", (f"{i}.dcm", _image(*image), "application/dicom"))
            for image in images
            for i in [image[2]]
        ]
        with httpx.Client(verify=cluster.tls(), timeout=120) as client:
            answer = client.post(
                f"{cluster.url}/api/v1/instances?facility={facility['slug']}",
                files=files,
                headers={"Authorization": f"Bearer {facility['token']}"},
            )
            answer.raise_for_status()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(upload, jobs))
    time.sleep(3)  # past RELAY_STUDY_QUIET_SECONDS
    cluster.celery("worker-a", "call", "transfers.tasks.studies_complete_quiet")
    uids = [uid for facility in made["facilities"] for uid in facility["study_uids"]]
    status = (
        "import json; from transfers.models import Study; "
        f"s = Study.objects.filter(study_instance_uid__in={uids!r}); "
        "print('RESULT ' + json.dumps({x.study_instance_uid: [str(x.uuid), x.status, "
        "x.rendered_at is not None if hasattr(x, 'rendered_at') else None] for x in s}))"
    )
    deadline = time.monotonic() + 600
    while True:
        out = cluster.manage("web-a", "shell", "-c", status)
        studies = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        if len(studies) == len(uids) and all(v[1] == "complete" for v in studies.values()):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the seeded studies did not complete: {studies}")
        time.sleep(2)
    # Every frame rendered and stored: the viewers read cached frames.
    expected = len(uids) * IMAGES_PER_STUDY
    while _renders(cluster) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {_renders(cluster)} of {expected} frames were rendered")
        time.sleep(2)
    for facility in made["facilities"]:
        facility["studies"] = [{"uuid": studies[uid][0]} for uid in facility.pop("study_uids")]
    made.update(
        password=PASSWORD,
        certificate=str(cluster.certificate),
        expires_on=(datetime.now(UTC) + timedelta(days=7)).date().isoformat(),
    )
    path = folder / "load-data.json"
    path.write_text(json.dumps(made))
    return path


def _renders(cluster: Cluster) -> int:
    return sum(1 for key in cluster.bucket_keys("renders/") if key.endswith(".rly"))


def locust_step(
    cluster: Cluster, data: Path, users: int, seconds: int, folder: Path
) -> dict[str, Any]:
    """One closed-loop step of `users` for `seconds`; per request kind (the part of the request's
    name before the colon) its count, failures, rate and percentiles, computed from locust's
    own response-time histograms of the kind's requests together."""
    report = folder / f"step-{users}.json"
    cpu_before = cpu_by_part(cluster)
    subprocess.run(  # noqa: S603
        [
            str(BIN / "locust"),
            *("-f", str(REPO / "bench" / "locustfile.py"), "--headless"),
            *("-u", str(users), "-r", str(max(users // 2, 1)), "-t", f"{seconds}s"),
            *("--host", cluster.url, "--json-file", str(report.with_suffix(""))),
            *("--stop-timeout", "10", "--loglevel", "WARNING", "--only-summary"),
        ],
        env={**os.environ, "RELAY_LOAD_DATA": str(data)},
        capture_output=True,
        timeout=seconds + 120,
        check=True,
    )
    cpu_after = cpu_by_part(cluster)
    entries = json.loads(report.read_text())
    kinds: dict[str, list[dict[str, Any]]] = {"all": entries}
    for entry in entries:
        kinds.setdefault(entry["name"].split(":", 1)[0], []).append(entry)
    result: dict[str, Any] = {"users": users, "seconds": seconds}
    for kind, group in kinds.items():
        result[kind] = _summary(group)
    result["names"] = {entry["name"]: _summary([entry]) for entry in entries}
    result["cpu_seconds"] = cpu_spent(cpu_before, cpu_after)
    return result


def _tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of a process and each of its living children, by pid."""
    import psutil

    seconds: dict[int, float] = {}
    try:
        root = psutil.Process(pid)
        for process in (root, *root.children(recursive=True)):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    except psutil.Error:
        pass
    return seconds


def cpu_by_part(cluster: Cluster) -> dict[str, dict[int, float]]:
    """Where the machine's CPU goes, by process: each node's processes, nginx, PostgreSQL,
    Redis and moto's S3 server; locust is this process's finished children (pid 0)."""
    import resource

    import psutil

    parts = {name: _tree_cpu(process.popen.pid) for name, process in cluster.processes.items()}
    parts["s3 (moto)"] = _tree_cpu(cluster.s3_pid)
    for label, program in (("postgresql", "postgres"), ("redis", "redis-server")):
        parts[label] = {}
        for found in psutil.process_iter(["name"]):
            if found.info["name"] == program:
                parts[label].update(_tree_cpu(found.pid))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    parts["locust (load generator)"] = {0: children.ru_utime + children.ru_stime}
    return parts


def cpu_spent(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    """CPU seconds each part used between two readings (a process that ended in between is
    left out; one that started counts whole)."""
    return {
        part: round(
            sum(seconds - before.get(part, {}).get(pid, 0.0) for pid, seconds in pids.items()), 1
        )
        for part, pids in after.items()
    }


def _summary(entries: list[dict[str, Any]]) -> dict[str, float]:
    """Requests, failures, requests per second and p50/p95/p99 (ms) of locust entries taken
    together (their response-time histograms added up)."""
    times: dict[float, int] = {}
    for entry in entries:
        for rounded, count in entry["response_times"].items():
            times[float(rounded)] = times.get(float(rounded), 0) + int(count)
    total = sum(times.values())
    span = max((e["last_request_timestamp"] or 0) - (e["start_time"] or 0) for e in entries) or 1.0

    def percentile(share: float) -> float:
        seen = 0
        for rounded in sorted(times):
            seen += times[rounded]
            if seen >= share * total:
                return rounded
        return 0.0

    return {
        "requests": total,
        "failures": sum(int(e["num_failures"]) for e in entries),
        "rps": round(total / span, 1),
        "p50": percentile(0.50),
        "p95": percentile(0.95),
        "p99": percentile(0.99),
    }


def load_section(
    *, users: tuple[int, ...] = (10, 25, 50), seconds: int = 40, nodes: tuple[int, ...] = (1, 2)
) -> dict[str, Any]:
    database_server = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    results: dict[str, Any] = {"steps": []}
    for web_nodes in nodes:
        folder = Path(tempfile.mkdtemp(prefix=f"relay-load-{web_nodes}-"))
        with cluster_running(
            folder / "nodes",
            database_server_url=database_server,
            redis_db=12,
            web_nodes=web_nodes,
            # Every locust user signs in from 127.0.0.1: the per-address sign-in limit would
            # refuse the 61st sign-in of a minute.
            extra_env={"RELAY_RATE_LOGIN": "10000/m/ip", "RELAY_RATE_LOGIN_FAILED": "10000/m/ip"},
        ) as cluster:
            print(f"  {web_nodes} web node(s): seeding ...", flush=True)
            data = seed(cluster, folder)
            for count in users:
                print(f"  {web_nodes} web node(s): {count} users for {seconds} s ...", flush=True)
                step = locust_step(cluster, data, count, seconds, folder)
                step["web_nodes"] = web_nodes
                results["steps"].append(step)
    return results


def load_table(results: dict[str, Any]) -> str:
    lines = [
        "Load test: 30 facilities, closed-loop users waiting 1-3 s (60 % viewers scrolling 20 "
        "frames, 30 % worklist, 10 % uploads and shares); nginx + gunicorn (2 workers per web "
        "node) + workers + PostgreSQL + Redis + moto S3, all on this machine",
        f"aim: no errors, p95 pages < {PAGE_AIM_MS} ms, p95 cached frames < {FRAME_AIM_MS} ms",
        "",
        "| web nodes | users | req/s | errors | pages p50/p95/p99 ms | frames p50/p95/p99 ms "
        "| uploads (10 images) p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for step in results["steps"]:
        page, frame = step.get("page", {}), step.get("frame", {})
        api = step.get("api", {})
        lines.append(
            f"| {step['web_nodes']} | {step['users']} | {step['all']['rps']} | "
            f"{step['all']['failures']} of {step['all']['requests']} | "
            f"{page.get('p50', 0):.0f} / {page.get('p95', 0):.0f} / {page.get('p99', 0):.0f} | "
            f"{frame.get('p50', 0):.0f} / {frame.get('p95', 0):.0f} / {frame.get('p99', 0):.0f} | "
            f"{api.get('p95', 0):.0f} |"
        )
    for step in results["steps"]:
        if step["users"] == max(s["users"] for s in results["steps"]):
            spent = sorted(step["cpu_seconds"].items(), key=lambda item: -item[1])
            total = sum(seconds for _, seconds in spent)
            lines.append("")
            lines.append(
                f"CPU seconds in the {step['seconds']} s step of {step['users']} users, "
                f"{step['web_nodes']} web node(s) ({total:.0f} s of the machine's "
                f"{(os.cpu_count() or 1) * step['seconds']} core-seconds): "
                + ", ".join(f"{part} {seconds}" for part, seconds in spent if seconds >= 0.5)
            )
    top: dict[int, float] = {}
    for step in results["steps"]:
        if step["users"] == max(s["users"] for s in results["steps"]):
            top[step["web_nodes"]] = step["all"]["rps"]
    if 1 in top and 2 in top:
        lines.append("")
        lines.append(
            f"throughput at the largest step: two web nodes {top[2]} req/s, one {top[1]} req/s "
            f"({top[2] / top[1]:.2f}x)"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", default="10,25,50")
    parser.add_argument("--seconds", type=int, default=40)
    parser.add_argument("--nodes", default="1,2")
    args = parser.parse_args()
    results = load_section(
        users=tuple(int(x) for x in args.users.split(",")),
        seconds=args.seconds,
        nodes=tuple(int(x) for x in args.nodes.split(",")),
    )
    print(load_table(results))
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
