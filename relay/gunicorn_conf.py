"""gunicorn's settings for Relay's web workers: `gunicorn -c python:relay.gunicorn_conf
relay.wsgi:application` (README, Commands). Command-line options given after `-c` win.

Memory: the master loads the application once (`preload_app`: Django, every view module, the
URLconf) and forks the workers from it, so its pages are shared between them instead of each
worker importing Django for itself. Python writes to an object whenever it counts a reference or
its garbage collector visits it, and each write copies the page it lies on into the worker;
`gc.freeze()` right before each fork moves everything loaded so far out of the collector's reach,
so the collector does not copy the shared pages into every worker. Measured with 4 idle workers
(proportional set size, shared pages counted once, `tests/relay/test_gunicorn_memory.py`):
272 MiB without preloading, 241 with it, 166 with it and the freeze.

Metrics: the workers count into files of one folder (RELAY_METRICS_DIR, prometheus_client's
multiprocess mode; portal/metrics.py says why files rather than a port per worker), which any
worker's /metrics adds up. The master starts the folder afresh for its workers when it starts,
and forgets a worker's live gauges when the worker ends; counters of ended workers stay counted.

A preloaded application is not reloaded by SIGHUP: deploy new code by restarting gunicorn (or
with USR2 then QUIT to the old master, gunicorn's upgrade without dropping connections).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from relay.env import env_str, var_dir

preload_app = True
# Long transfers (a 2 GiB upload, a study's ZIP over a slow line) run as long as they take. A
# sync worker tells the master it is alive only between requests, so any request longer than
# `timeout` (30 s) was killed mid-transfer; a gthread worker's main thread keeps telling it
# while its request thread works (tests/relay/test_long_transfers.py). One thread per worker:
# the same one-request-at-a-time concurrency as before.
worker_class = "gthread"
threads = 1
# Every access-log field that can hold a URL is redacted (link tokens, QIDO query strings).
logger_class = "relay.logs.RedactingGunicornLogger"
# gunicorn 27's control socket (`gunicornc`) in Relay's var folder: its default,
# ~/.gunicorn/gunicorn.ctl, is one path for every gunicorn the user runs.
control_socket = str(var_dir() / "gunicorn.ctl")


def on_starting(server: Any) -> None:
    """In the master, once, before the first worker is forked (after preloading)."""
    from portal.metrics import metrics_process_start

    metrics_process_start("web", Path(env_str("RELAY_METRICS_DIR") or str(var_dir() / "metrics")))


def child_exit(server: Any, worker: Any) -> None:
    """In the master, when a worker has ended (recycled, killed, timed out)."""
    from portal.metrics import metrics_process_dead

    metrics_process_dead(worker.pid)


def pre_fork(server: Any, worker: Any) -> None:
    """In the master, before each worker is forked."""
    from django.db import connections

    # No connection opened while loading (a check, a migration probe) may be shared by the
    # workers: each opens its own on its first request.
    connections.close_all()
    gc.collect()
    gc.freeze()
