"""Benchmark tasks that run inside Relay's environment, one process per task.

    .venv/bin/python bench/inrelay.py TASK '{"json": "arguments"}'

run.py starts this with the environment of the benchmark's Relay server (RelayServer.task), so
it sees the same database and the same image storage as gunicorn and the gateway. Each task
calls Relay's own code (push_send, export_plan / zip_stream / iso_build, study_render,
frame_render_get / thumbnail_get), times it with perf_counter and prints one line
"BENCH-RESULT {json}" on stdout. Each process also reports its resident memory after
django.setup() and its high-water mark (ru_maxrss), so that the memory a task needs is known
apart from the ~100 MiB every Django process carries.

Logging: Django's settings send INFO to the console; a Celery worker started without `-l` logs
WARNING and up, and `manage.py dicom_gateway` turns pynetdicom down to WARNING, so the tasks do
the same (pynetdicom logs several lines per C-STORE at INFO).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "relay.settings")

MiB = 1024 * 1024
RESULT = "BENCH-RESULT "


def rss_now() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _study(uuid: str) -> Any:
    from transfers.models import Study

    return Study.objects.select_related("facility").get(uuid=uuid)


# --- tasks --------------------------------------------------------------------------------------


def study_info(args: dict[str, Any]) -> dict[str, Any]:
    """The study the benchmark ingested: its uuid and every instance's storage key."""
    from transfers.models import Instance, Study

    study = Study.objects.get(
        facility__slug=args["facility"], study_instance_uid=args["study_instance_uid"]
    )
    instances = [
        {
            "sop_instance_uid": i.sop_instance_uid,
            "series_instance_uid": i.series.series_instance_uid,
            "storage_key": i.storage_key,
            "size": i.size_bytes,
            "frames": i.number_of_frames,
            "instance_number": i.instance_number,
        }
        for i in Instance.objects.filter(series__study=study)
        .select_related("series")
        .order_by("instance_number", "id")
    ]
    from django.conf import settings

    return {
        "uuid": str(study.uuid),
        "pk": study.pk,
        "status": study.status,
        "media_root": str(settings.MEDIA_ROOT),
        "instances": instances,
    }


def push(args: dict[str, Any]) -> dict[str, Any]:
    """transfers.dicom.push.push_send of the whole study into a PACS (one association)."""
    from portal.models import User
    from transfers.dicom.push import PushTransient, push_send
    from transfers.models import Instance, PacsDestination, Push, PushInstance

    study = _study(args["study_uuid"])
    destination = PacsDestination.objects.create(
        facility=study.facility,
        name="Benchmark PACS",
        ae_title=args["ae_title"],
        host="127.0.0.1",
        port=args["port"],
    )
    record = Push.objects.create(
        study=study,
        destination=destination,
        requested_by=User.objects.get(email=args["email"]),
    )
    PushInstance.objects.bulk_create(
        PushInstance(push=record, instance_id=pk)
        for pk in Instance.objects.filter(series__study=study).values_list("pk", flat=True)
    )
    transient = ""
    started = time.perf_counter()
    try:
        push_send(push=record)
    except PushTransient as exc:
        transient = str(exc)
    wall = time.perf_counter() - started
    record.refresh_from_db()
    errors = list(record.items.exclude(error="").values_list("error", flat=True)[:3])
    return {
        "wall_s": wall,
        "status": record.status,
        "sent": record.sent,
        "failed": record.failed,
        "transient": transient,
        "errors": errors,
    }


def export(args: dict[str, Any]) -> dict[str, Any]:
    """export_plan, zip_stream read to the end, iso_size and iso_build into a temporary file."""
    from transfers.media.export import (
        export_plan,
        iso_build,
        iso_size,
        volume_label_for,
        zip_stream,
    )
    from transfers.reports import reports_for

    study = _study(args["study_uuid"])
    result: dict[str, Any] = {}
    started = time.perf_counter()
    plan = export_plan(studies=[study], reports_of=lambda s: reports_for(s, share_ids=None))
    result["plan_s"] = time.perf_counter() - started
    result["image_bytes"] = plan.image_bytes
    result["images"] = plan.images
    result["peak_after_plan"] = rss_peak()

    started = time.perf_counter()
    zip_bytes = 0
    for chunk in zip_stream(plan):
        zip_bytes += len(chunk)
    result["zip_s"] = time.perf_counter() - started
    result["zip_bytes"] = zip_bytes
    result["peak_after_zip"] = rss_peak()

    started = time.perf_counter()
    expected = iso_size(plan)
    result["iso_size_s"] = time.perf_counter() - started
    with tempfile.TemporaryFile(dir=args.get("tmp_dir")) as out:
        started = time.perf_counter()
        iso_build(plan, out=out, volume_label=volume_label_for([study]))
        out.flush()
        result["iso_s"] = time.perf_counter() - started
        result["iso_bytes"] = os.fstat(out.fileno()).st_size
    result["iso_expected_bytes"] = expected
    result["peak_after_iso"] = rss_peak()
    return result


def render(args: dict[str, Any]) -> dict[str, Any]:
    """study_render: every frame's viewer data and every series thumbnail, as the render task."""
    from django.core.files.storage import storages

    from transfers.models import Instance
    from transfers.viewer.render import frame_render_key, study_render

    study = _study(args["study_uuid"])
    started = time.perf_counter()
    made = study_render(study)
    wall = time.perf_counter() - started
    storage = storages["default"]
    frames = missing = 0
    for instance in Instance.objects.filter(series__study=study):
        for frame in range(max(instance.number_of_frames, 1)):
            frames += 1
            if not storage.exists(frame_render_key(storage_key=instance.storage_key, frame=frame)):
                missing += 1
    return {"wall_s": wall, "made": made, "frames": frames, "missing": missing}


def viewer(args: dict[str, Any]) -> dict[str, Any]:
    """Server-side time of the viewer's data, without HTTP: look the instance up as a view would
    and get its frame (frame_render_get), and the series thumbnail (thumbnail_get)."""
    from transfers.models import Instance, Series
    from transfers.viewer.render import frame_render_get, thumbnail_get

    study = _study(args["study_uuid"])

    def frame(uid: str) -> int:
        instance = Instance.objects.select_related("series").get(
            series__study=study, sop_instance_uid=uid
        )
        rendered = frame_render_get(instance, 0)
        if rendered.meta.get("error"):
            raise RuntimeError(f"frame of {uid}: {rendered.meta['error']}")
        return len(rendered.gz)

    def thumbnail(uid: str) -> int:
        series = Series.objects.select_related("study__facility").get(
            study=study, series_instance_uid=uid
        )
        return len(thumbnail_get(series))

    def timed(call: Callable[[str], int], uids: list[str]) -> tuple[list[float], int]:
        times, size = [], 0
        for uid in uids:
            started = time.perf_counter()
            size = call(uid)
            times.append(time.perf_counter() - started)
        return times, size

    uids, series_uids = args["sop_instance_uids"], args["series_instance_uids"]
    cold_frames, _ = timed(frame, uids)  # renders what is missing; warm when rendered before
    cold_thumbs, _ = timed(thumbnail, series_uids[:1])
    frames, frame_size = timed(frame, uids)
    thumbs, thumb_size = timed(thumbnail, (series_uids * len(uids))[: len(uids)])
    return {
        "first_pass_s": cold_frames,
        "first_thumbnail_s": cold_thumbs,
        "frame_s": frames,
        "frame_gz_bytes": frame_size,
        "thumbnail_s": thumbs,
        "thumbnail_bytes": thumb_size,
    }


def facility_token(args: dict[str, Any]) -> dict[str, Any]:
    """A second facility for the benchmark user, with an upload token of its own: STOW-RS of
    the same series there stores it anew (instances are deduplicated per facility)."""
    from portal.models import ApiToken, Facility, Membership, User

    user = User.objects.get(email=args["email"])
    facility, _ = Facility.objects.get_or_create(
        slug=args["slug"], defaults={"name": f"Benchmark {args['slug']}"}
    )
    Membership.objects.get_or_create(user=user, facility=facility, defaults={"role": "sender"})
    _, raw = ApiToken.issue(user=user, name=f"benchmark {args['slug']}", facility=facility)
    return {"token": raw, "facility": facility.slug}


TASKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "facility_token": facility_token,
    "study_info": study_info,
    "push": push,
    "export": export,
    "render": render,
    "viewer": viewer,
}


def main() -> int:
    name, args = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
    started = time.perf_counter()
    import django

    django.setup()
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    setup_s = time.perf_counter() - started
    rss_setup = rss_now()
    result = TASKS[name](args)
    result.update(setup_s=setup_s, rss_after_setup=rss_setup, rss_peak=rss_peak())
    print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
