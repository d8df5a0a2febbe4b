"""Frames on S3 (issue 18): what one read of a stored render, and of a stored image, costs in
requests and time, on disk and in a bucket, before and after reads became one GetObject.

    .venv/bin/python bench/s3_frames.py               # prints the table
    .venv/bin/python bench/s3_frames.py --frames 200  # more reads per row

moto's S3 server runs as its own process on a free loopback port (`moto_server`, as
tests/cluster.py starts it), with a bucket made for the run. A child Python process sets Django
up in a throwaway var folder and stores the renders of a synthetic 512 x 512 CT (16-bit values
with noise, gzipped as Relay stores them: about 260 KiB each) under Relay's render keys, in a
folder (relay.storage.AtomicFileSystemStorage) and in the bucket, and as many image-sized objects
(525 KiB, with their SHA-256). Then it times reads one after the other, after one warm-up pass:

- "frame": `transfers.viewer.render.frame_render_get` of a stored render, the function the
  frame endpoint and WADO-RS rendered call: now `_read` (one `read_bytes`) and the unpacking;
- "image": `transfers.integrity.verified_open` read to its end and checked against its SHA-256,
  the read behind the viewer's decode, the tag browser, DICOMweb, the ZIP and the push;
- "before" is main before this change, on the bucket: django-storages' own S3Storage with the
  render read as it was (`exists()` then `open()`), and its `open()` for the image.

Requests are counted from the storage's boto3 client (botocore's `response-received` events),
per read. The figures are one loopback hop to moto (a Python server on the same 2 CPUs): a real
bucket adds its network round trip to every request, so the saving per frame grows with it.
There is no peer.

`run.py` does not call this yet; `s3_frames_section()` returns the figures and
`s3_frames_table()` prints them, like the billing section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
MOTO = REPO / ".venv" / "bin" / "moto_server"
BUCKET = "relay-bench-frames"
KEYS = {"access_key": "bench", "secret_key": "bench-secret"}  # moto's, on loopback
MARK = "S3-FRAMES "


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(port: int, deadline_s: float = 30) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto's S3 server did not listen on port {port}")


# --- the parent: moto's server and the child -----------------------------------------------------


def s3_frames_section(*, frames: int = 100) -> dict[str, Any]:
    """Start moto's server, measure in a child process, stop it; the child's figures."""
    port = _free_port()
    var = tempfile.mkdtemp(prefix="relay-bench-s3-")
    log = (Path(var) / "moto.log").open("wb")
    server = subprocess.Popen(
        [str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        _wait_for(port)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "relay.settings",
            "RELAY_VAR_DIR": var,
            "S3_BENCH_ENDPOINT": f"http://127.0.0.1:{port}",
        }
        for name in ("S3_BUCKET", "DATABASE_URL", "REDIS_URL"):
            env.pop(name, None)
        done = subprocess.run(
            [str(PYTHON), str(Path(__file__).resolve()), "--child", "--frames", str(frames)],
            cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"the S3 frames benchmark failed:\n{done.stderr[-3000:]}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(var, ignore_errors=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith(MARK))
    return dict(json.loads(line.removeprefix(MARK)))


def s3_frames_table(result: dict[str, Any]) -> str:
    rows = [["read", "where", "requests per read", "ms per read (median)", "p95 ms"]]
    for row in result["rows"]:
        rows.append(
            [
                row["read"],
                row["where"],
                f"{row['requests']:.0f} ({row['operations']})" if row["operations"] else "0",
                f"{row['median_ms']:.2f}",
                f"{row['p95_ms']:.2f}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"Reads on S3 (moto on loopback) and on disk: {result['frames']} reads per row, "
        f"renders {result['render_kib']:.0f} KiB, images {result['image_kib']:.0f} KiB"
    ]
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(*, frames: int = 100) -> dict[str, Any]:
    result = s3_frames_section(frames=frames)
    print(s3_frames_table(result))
    return result


# --- the child: Django, the storages, the reads ---------------------------------------------------


def _child(frames: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    import gzip
    import hashlib
    import statistics

    import boto3
    import django
    import numpy as np

    from relay.embedded import var_prepare

    var_prepare()
    django.setup()
    from django.core.files.base import ContentFile
    from django.core.files.storage import Storage
    from storages.backends.s3 import S3Storage

    from relay.s3 import AtomicS3Storage
    from relay.storage import AtomicFileSystemStorage
    from transfers import integrity
    from transfers.models import Instance
    from transfers.viewer import render

    endpoint = os.environ["S3_BENCH_ENDPOINT"]
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEYS["access_key"],
        aws_secret_access_key=KEYS["secret_key"],
    ).create_bucket(Bucket=BUCKET)
    options: dict[str, Any] = {
        "bucket_name": BUCKET,
        "endpoint_url": endpoint,
        "region_name": "us-east-1",
        "default_acl": None,
        "file_overwrite": False,
        "object_parameters": {"ServerSideEncryption": "AES256"},
        **KEYS,
    }
    folder = Path(os.environ["RELAY_VAR_DIR"]) / "bench-media"
    disk = AtomicFileSystemStorage(location=folder)
    s3_after = AtomicS3Storage(**options)
    s3_before = S3Storage(**options)  # django-storages' own, as main configured before

    # A CT-like frame: a body of soft tissue in air, a bone ring, noise; int16 values.
    rng = np.random.default_rng(18)
    y, x = np.mgrid[-256:256, -256:256]
    radius = np.hypot(x, y)
    base = np.where(radius < 200, 40, -1000) + np.where((radius > 150) & (radius < 165), 700, 0)
    instances: list[Instance] = []
    images: list[tuple[str, int, str]] = []
    render_bytes = image_bytes = 0
    for i in range(frames):
        values = (base + rng.normal(0, 12, base.shape)).astype("<i2")
        rendered = render.RenderedFrame(
            meta={"rows": 512, "columns": 512, "kind": "gray", "dtype": "int16", "error": None},
            gz=gzip.compress(values.tobytes(), compresslevel=render.GZIP_LEVEL, mtime=0),
        )
        storage_key = f"dicom/bench/1.2.3/1.2.3.4/1.2.3.4.{i}.{i:012x}.dcm"
        instance = Instance(storage_key=storage_key, number_of_frames=1)
        blob = render._pack(rendered)
        render_bytes += len(blob)
        image = values.tobytes() + bytes(1024 * 13)  # a header's worth more
        image_bytes += len(image)
        for storage in (disk, s3_after):
            storage.save(
                render.frame_render_key(storage_key=storage_key, frame=0), ContentFile(blob)
            )
            storage.save(storage_key, ContentFile(image))
        instances.append(instance)
        images.append((storage_key, len(image), hashlib.sha256(image).hexdigest()))

    def read_before(storage: Storage, instance: Instance) -> Any:
        # transfers/viewer/render.py's frame read as it was on main: exists() then open().
        key = render.frame_render_key(storage_key=instance.storage_key, frame=0)
        if not storage.exists(key):
            return None
        with storage.open(key, "rb") as fp:
            return render._unpack(bytes(fp.read()))

    def image_read(storage: Storage, item: tuple[str, int, str]) -> None:
        key, size, sha256 = item
        with integrity.verified_open(storage, key, size=size, sha256=sha256) as reader:
            while reader.read(integrity.CHUNK):
                pass

    made: list[str] = []

    def note(event_name: str, **_: Any) -> None:
        made.append(event_name.rsplit(".", 1)[-1])

    def measure(
        label: str, where: str, storage: Storage, call: Any, items: list[Any]
    ) -> dict[str, Any]:
        client = getattr(storage, "connection", None)
        events = client.meta.client.meta.events if client is not None else None
        for item in items[: max(len(items) // 10, 1)]:  # warm-up: connections, imports
            call(storage, item)
        if events is not None:
            events.register("response-received.s3", note)
        made.clear()
        times = []
        try:
            for item in items:
                started = time.perf_counter()
                result = call(storage, item)
                times.append((time.perf_counter() - started) * 1000)
                if label == "frame":  # a stored render, read back whole
                    assert result is not None and result.meta["error"] is None
        finally:
            if events is not None:
                events.unregister("response-received.s3", note)
        operations: dict[str, int] = {}
        for name in made:
            operations[name] = operations.get(name, 0) + 1
        per = ", ".join(f"{n / len(items):g} {op}" for op, n in operations.items())
        times.sort()
        return {
            "read": label,
            "where": where,
            "requests": len(made) / len(items),
            "operations": per,
            "median_ms": statistics.median(times),
            "p95_ms": times[int(len(times) * 0.95) - 1],
        }

    def frame_get(storage: Storage, instance: Instance) -> Any:
        return render.frame_render_get(instance, 0)

    # frame_render_get reads storages["default"] (render._storage): pointed at each in turn.
    render_storage = render._storage
    rows = []
    try:
        for where, storage, call in (
            ("disk", disk, frame_get),
            ("S3, before (exists + open)", s3_before, read_before),
            ("S3, after (one GetObject)", s3_after, frame_get),
        ):
            render._storage = lambda s=storage: s
            rows.append(measure("frame", where, storage, call, instances))
    finally:
        render._storage = render_storage
    for where, storage in (
        ("disk", disk),
        ("S3, before (S3File: HEAD, HEAD, GET)", s3_before),
        ("S3, after (one GetObject)", s3_after),
    ):
        rows.append(measure("image", where, storage, image_read, images))
    return {
        "frames": frames,
        "render_kib": render_bytes / len(instances) / 1024,
        "image_kib": image_bytes / len(images) / 1024,
        "rows": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=100, help="reads per row (100)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    if args.child:
        print(MARK + json.dumps(_child(args.frames)), flush=True)
        return 0
    result = run(frames=args.frames)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
