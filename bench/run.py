"""Benchmark: Relay next to Orthanc on one CT series (ingest, DICOM, media, viewer).

    .venv/bin/python bench/run.py            # or: make bench
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/relay .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --only gateway,push     # some sections only

A 300-slice 512 x 512 CT series (about 150 MiB, generated once into bench/out/cache/) is uploaded
by 4 client threads to Relay's HTTP API on gunicorn (4 workers, as in production) and to Orthanc's
REST API, each server fresh. The first half of the series (150 slices) is uploaded the same way
to two more fresh servers, to see whether a server's memory grows with the size of a study.
Then one more Relay (with `manage.py dicom_gateway`) takes the series over DICOM and the
sections of dicom.py and viewer.py measure the gateway, push to PACS, ZIP and CD export,
rendering, the viewer's data and the first image in Chromium, each next to its peer.
The tables are printed and bench/out/results.json is written. See bench/README.md.

The helpers next to this file (series, servers, measure) are imported as top-level modules:
Python puts a script's own folder first on sys.path, and bench/ is not a package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from dicom import Workbench, cd_section, gateway_section, push_section, zip_section
from dicomweb import dicomweb_section
from index_scale import index_section, index_table
from invoicing import billing_section, billing_table
from load import load_section, load_table
from measure import MiB, Section, UploadFailed, UploadRun, summarize, upload_series
from purge_scale import purge_section, purge_table
from s3_frames import s3_frames_section, s3_frames_table
from series import SIZE, Series, ensure_series
from servers import ORTHANC, REPO, Database, OrthancServer, RelayServer
from viewer import browser_section, render_section, viewer_section

OUT = Path(__file__).resolve().parent / "out"


# --- the two servers ----------------------------------------------------------------------------


def bench_relay(database: Database, files: list[Path], threads: int) -> UploadRun:
    sop_uids: list[str] = []

    def check(path: Path, response: httpx.Response) -> None:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 201 or body.get("status") != "stored":
            raise UploadFailed(
                f"Relay answered {path.name} with HTTP {response.status_code}: {response.text[:500]}"
            )
        sop_uids.append(body["sop_instance_uid"])

    with RelayServer(database) as relay:
        run = upload_series(
            server="Relay",
            url=relay.upload_url,
            headers=relay.auth_headers,
            files=files,
            check=check,
            server_pid=relay.pid,
            threads=threads,
        )
        # Outside the timing: every instance answered "stored" must be in the index too.
        known = httpx.post(
            f"{relay.base_url}/api/v1/instances/known",
            json={"facility": relay.facility, "sop_instance_uids": sop_uids},
            headers=relay.auth_headers,
            timeout=60,
        )
        known.raise_for_status()
        if len(known.json()["known"]) != len(files):
            raise UploadFailed(
                f"Relay indexed {len(known.json()['known'])} of {len(files)} instances"
            )
        run.extra["stored_mib"] = round(relay.stored_bytes() / MiB, 1)
        run.extra["workers"] = relay.workers
    return run


def bench_orthanc(files: list[Path], threads: int) -> UploadRun:
    def check(path: Path, response: httpx.Response) -> None:
        try:
            status = response.json().get("Status")
        except (ValueError, AttributeError):
            status = None
        if response.status_code != 200 or status != "Success":
            raise UploadFailed(
                f"Orthanc answered {path.name} with HTTP {response.status_code}: {response.text[:500]}"
            )

    with OrthancServer() as orthanc:
        run = upload_series(
            server="Orthanc",
            url=orthanc.upload_url,
            headers={},
            files=files,
            check=check,
            server_pid=orthanc.pid,
            threads=threads,
        )
        stats = httpx.get(f"{orthanc.base_url}/statistics", timeout=30).json()
        if int(stats["CountInstances"]) != len(files):
            raise UploadFailed(
                f"Orthanc indexed {stats['CountInstances']} of {len(files)} instances"
            )
        run.extra["stored_mib"] = round(orthanc.stored_bytes() / MiB, 1)
        run.extra["version"] = orthanc.version()
    return run


# --- context ------------------------------------------------------------------------------------


def git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    # A dirty tree is worth knowing: the numbers are for the working copy, not the commit.
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict[str, Any]:
    return {
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


# --- tables -------------------------------------------------------------------------------------


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main_table(relay: dict[str, Any], orthanc: dict[str, Any]) -> str:
    title = f"ingest {relay['files']} x {SIZE}x{SIZE} CT ({relay['total_mib']:.0f} MiB)"
    rows = [[title, "Relay", "Orthanc", "Relay / Orthanc", "aim"]]
    for label, key, fmt, aim in (
        ("wall time (s)", "wall_s", "{:.2f}", "<= 1.00x"),
        ("wall time, fastest run (s)", "wall_s_min", "{:.2f}", ""),
        ("throughput (MiB/s)", "throughput_mib_s", "{:.1f}", ""),
        ("files per second", "files_per_s", "{:.1f}", ""),
        ("peak server RSS (MiB)", "peak_rss_mib", "{:.0f}", ""),
        ("server CPU time (s)", "server_cpu_s", "{:.1f}", "<= 1.00x"),
        ("request latency median (ms)", "latency_median_s", "{:.0f}", ""),
        ("request latency p95 (ms)", "latency_p95_s", "{:.0f}", ""),
        ("request latency max (ms)", "latency_max_s", "{:.0f}", ""),
        ("stored on disk (MiB)", "stored_mib", "{:.1f}", ""),
    ):
        scale = 1000 if key.startswith("latency") else 1
        a, b = relay[key] * scale, orthanc[key] * scale
        rows.append([label, fmt.format(a), fmt.format(b), ratio(a, b), aim])
    return table(rows)


def memory_table(half: dict[str, dict[str, Any]], full: dict[str, dict[str, Any]]) -> str:
    n_half, n_full = half["Relay"]["files"], full["Relay"]["files"]
    rows = [[f"server memory vs study size ({n_half} / {n_full} slices)", "Relay", "Orthanc"]]

    def row(label: str, value: Any) -> None:
        rows.append([label, value("Relay"), value("Orthanc")])

    row("idle RSS before upload (MiB)", lambda s: f"{full[s]['idle_rss_mib']:.0f}")
    row(
        "idle PSS before upload, shared pages once (MiB; aim <= 200)",
        lambda s: f"{full[s].get('idle_pss_mib', 0):.0f}",
    )
    row(f"peak RSS, {n_half} slices (MiB)", lambda s: f"{half[s]['peak_rss_mib']:.0f}")
    row(f"peak RSS, {n_full} slices (MiB)", lambda s: f"{full[s]['peak_rss_mib']:.0f}")
    row(
        "growth, half -> full (MiB)",
        lambda s: f"{full[s]['peak_rss_mib'] - half[s]['peak_rss_mib']:+.0f}",
    )
    row(f"wall time, {n_half} slices (s)", lambda s: f"{half[s]['wall_s']:.2f}")
    row(f"throughput, {n_half} slices (MiB/s)", lambda s: f"{half[s]['throughput_mib_s']:.1f}")
    return table(rows)


# --- DICOM, media and viewer sections ------------------------------------------------------------

# Run order: rendering starts right after the ingest into the gateway (before Orthanc's side of
# section 1); the viewer is timed once the frames are rendered; push, ZIP and CD read what the
# gateway stored.
SECTIONS: dict[str, tuple[str, Callable[[Workbench], Section]]] = {
    "render": ("5. rendering every frame after the ingest", render_section),
    "gateway": ("1. C-STORE into the gateway vs Orthanc", gateway_section),
    "viewer": ("6. viewer data and thumbnails vs Orthanc", viewer_section),
    "browser": ("7. time to first image in headless Chromium", browser_section),
    "push": ("2. push to PACS vs storescu", push_section),
    "zip": ("3. ZIP export vs reading the files", zip_section),
    "cd": ("4. CD image build", cd_section),
    "dicomweb": ("8. DICOMweb STOW-RS and WADO-RS vs Orthanc's plugin", dicomweb_section),
}
PRINT_ORDER = ("gateway", "push", "zip", "cd", "render", "viewer", "browser", "dicomweb")
# Sections that start what they need themselves: (what the line says, run it, its table).
STANDALONE: dict[str, tuple[str, Callable[[], dict[str, Any]], Callable[[dict[str, Any]], str]]] = {
    "billing": (
        "billing: 1,000 facilities, 1,000,000 usage rows on PostgreSQL",
        billing_section,
        billing_table,
    ),
    "index": (
        "index: 100,000 studies, 10,000,000 instances on PostgreSQL",
        index_section,
        index_table,
    ),
    "s3frames": (
        "frames and stored images read from S3 (moto) and from disk",
        s3_frames_section,
        s3_frames_table,
    ),
    "purge": (
        "purge: 1,000,000 instances of studies whose shares lapsed, on PostgreSQL",
        purge_section,
        purge_table,
    ),
    "load": (
        "load test: 30 facilities on one and on two web nodes (tests/cluster.py)",
        load_section,
        load_table,
    ),
}
CHOICES = ("ingest", *PRINT_ORDER, *STANDALONE)


def run_sections(series: Series, database: Database, selected: list[str]) -> list[Section]:
    """One Relay with its gateway takes the series by C-STORE; then each selected section runs
    on it. A section that fails gets its error printed and the others still run."""
    results: dict[str, Section] = {}
    started = time.perf_counter()
    with ExitStack() as stack:
        wb = Workbench(series=series, database=database, stack=stack)
        print("  starting Relay + gateway, C-STORE of the series into the gateway ...", flush=True)
        try:
            wb.start()
        except Exception as exc:
            traceback.print_exc()
            for key in selected:
                title = SECTIONS[key][0]
                results[key] = Section(key=key, title=title, error=f"no study in Relay: {exc}")
        else:
            assert wb.ingest is not None
            print(f"  ingest ({wb.ingest_how}): {wb.ingest.wall_s:.2f} s", flush=True)
            for key, (title, measure) in SECTIONS.items():
                if key not in selected:
                    continue
                print(f"  {title} ...", flush=True)
                section_started = time.perf_counter()
                try:
                    results[key] = measure(wb)
                except Exception as exc:
                    print(f"  {title}: FAILED", file=sys.stderr)
                    traceback.print_exc()
                    results[key] = Section(
                        key=key, title=title, error=f"{type(exc).__name__}: {exc}"
                    )
                print(f"    ({time.perf_counter() - section_started:.1f} s)", flush=True)
        print("  stopping the servers ...", flush=True)
    print(f"  DICOM, media and viewer sections: {time.perf_counter() - started:.0f} s", flush=True)
    # Printed in the order of the issues' lists (1-4 DICOM and media, 5-7 viewer).
    return [results[key] for key in PRINT_ORDER if key in results]


def section_table(section: Section) -> str:
    if section.error:
        return f"{section.title}\n  {section.error}"
    rows = [[section.title, section.relay_label, section.peer_label, "ratio", "aim"]]
    rows += [row.cells() for row in section.rows]
    lines = [table(rows)]
    lines += [f"  {note}" for note in section.notes]
    return "\n".join(lines)


def orthanc_version() -> str:
    try:
        done = subprocess.run(
            [str(ORTHANC), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.split()[1] if done.stdout.split()[1:] else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300, help="slices in the full series (300)")
    parser.add_argument("--threads", type=int, default=4, help="concurrent uploads (4)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="fresh-server runs per ingest measurement (3)"
    )
    parser.add_argument(
        "--only",
        default=",".join(CHOICES),
        help=f"comma-separated sections to run, of: {', '.join(CHOICES)} (all)",
    )
    args = parser.parse_args()
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in selected if name not in CHOICES]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(CHOICES)}")

    print(
        f"Preparing the {args.slices}-slice CT series (cached in {OUT / 'cache'}) ...", flush=True
    )
    series = ensure_series(OUT / "cache", args.slices)
    database = Database.from_environment()
    context: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "database": database.label,
        "database_version": database.describe_server(),
        "orthanc_version": orthanc_version(),
        "commit": git_commit(),
        "threads": args.threads,
        "repeats": args.repeats,
        "sections": selected,
        "series": {
            "slices": len(series.files),
            "bytes": series.total_bytes,
            "folder": str(series.folder),
        },
        # Other work on the machine slows both servers; the load average says how busy it was.
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    started = time.perf_counter()

    raw: dict[tuple[int, str], list[dict[str, Any]]] = {}
    half_count, full_count = len(series.files) // 2, len(series.files)
    if "ingest" in selected:
        print("HTTP ingest, Relay and Orthanc:", flush=True)
        # Every upload goes to a freshly started server. The repeats are interleaved (Relay,
        # Orthanc, Relay, ...) rather than grouped, so that a burst of load from elsewhere hits
        # both alike.
        for repeat in range(1, args.repeats + 1):
            for count in (half_count, full_count):
                files = series.files[:count]
                for name, bench in (
                    ("Relay", lambda f=files: bench_relay(database, f, args.threads)),
                    ("Orthanc", lambda f=files: bench_orthanc(f, args.threads)),
                ):
                    result = bench().as_dict()
                    raw.setdefault((count, name), []).append(result)
                    print(
                        f"  run {repeat}/{args.repeats} {name:7} {count:4} files: "
                        f"{result['wall_s']:6.2f} s {result['throughput_mib_s']:6.1f} MiB/s, "
                        f"peak RSS {result['peak_rss_mib']:4.0f} MiB",
                        flush=True,
                    )

    sections: list[Section] = []
    wanted = [name for name in selected if name in SECTIONS]
    if wanted:
        print(f"DICOM, media and viewer ({', '.join(wanted)}):", flush=True)
        sections = run_sections(series, database, wanted)
    standalone: dict[str, dict[str, Any]] = {}
    for key, (what, measure, _) in STANDALONE.items():
        if key not in selected:
            continue
        print(f"{what} ...", flush=True)
        try:
            standalone[key] = measure()
        except Exception as exc:  # the other tables still print
            print(f"  {key} failed: {exc!r}", flush=True)
    context["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    context["elapsed_s"] = round(time.perf_counter() - started, 1)

    summary = {key: summarize(runs) for key, runs in raw.items()}
    m = context["machine"]
    print()
    print(f"machine: nproc={m['nproc']}, {m['memory_gib']} GiB RAM, Python {m['python']}, ", end="")
    print(
        f"load average {context['load_average_start'][0]} at start, {context['load_average_end'][0]} at end"
    )
    print(
        f"database: {context['database_version']}   "
        f"Orthanc {context['orthanc_version']}   commit: {context['commit']}   "
        f"benchmark took {context['elapsed_s']:.0f} s"
    )
    if summary:
        half = {name: summary[(half_count, name)] for name in ("Relay", "Orthanc")}
        full = {name: summary[(full_count, name)] for name in ("Relay", "Orthanc")}
        print(
            f"client: {args.threads} threads (httpx, one connection each); RSS sampled every 50 ms; "
            f"median of {args.repeats} fresh-server runs, peak RSS the highest"
        )
        print()
        print(main_table(full["Relay"], full["Orthanc"]))
        print()
        print(memory_table(half, full))
    if sections:
        print()
        print(
            f"DICOM, media and viewer on the same {len(series.files)}-slice CT, one Relay "
            "(gunicorn + manage.py dicom_gateway) that received it by C-STORE; "
            "ratio = Relay / peer"
        )
        for section in sections:
            print()
            print(section_table(section))

    for key, result in standalone.items():
        print()
        print(STANDALONE[key][2](result))

    OUT.mkdir(parents=True, exist_ok=True)
    results = {
        **standalone,
        **context,
        "summary": list(summary.values()),
        "runs": [run for runs in raw.values() for run in runs],
        "dicom_media_viewer": [section.as_dict() for section in sections],
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {OUT / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
