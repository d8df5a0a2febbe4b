"""Four idle web workers, started as the README says (`gunicorn -c python:relay.gunicorn_conf`),
hold less than 210 MiB of memory in all, counted as an operator's `smem` counts it: each page
once, shared pages split between the processes that share them (proportional set size, PSS).

The master loads Django and every view before it forks, and freezes the garbage collector's
objects so the workers do not copy the shared pages (relay/gunicorn_conf.py). Measured: 272 MiB
when each worker loads Django itself, about 165 MiB as configured. The sum of RSS counts every
shared page once per process (about 360 MiB either way) and is printed beside it.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from tests.server_process import relay_run, relay_server

WORKERS = 4
CEILING_MIB = 210
MiB = 1024 * 1024


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:  # noqa: S310 - our loopback URL
            answer.read()
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_four_idle_workers_share_the_preloaded_application(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'relay.sqlite3'}"  # a database of the test's own
    relay_run(tmp_path, ["manage.py", "migrate", "--verbosity", "0"], database_url=database)
    with relay_server(
        tmp_path,
        database_url=database,
        workers=WORKERS,
        control_socket=True,
        args=("--access-logfile", "-"),
    ) as server:
        master = psutil.Process(server.pid)
        base = server.url
        deadline = time.monotonic() + 60
        while len(master.children()) < WORKERS or _get_quietly(base + "/accounts/login/") != 200:
            assert time.monotonic() < deadline, f"gunicorn did not start:\n{server.log.read_text()}"
            time.sleep(0.2)
        # Every worker answers a page and the API (each takes one request at a time, so rounds
        # of 2 x workers concurrent requests reach each of them).
        with ThreadPoolExecutor(2 * WORKERS) as pool:
            for _ in range(6):
                pages = list(pool.map(_get, [base + "/accounts/login/"] * (2 * WORKERS)))
                api = list(pool.map(_get, [base + "/api/v1/facilities"] * (2 * WORKERS)))
                assert set(pages) == {200} and set(api) == {401}, (pages, api)
        time.sleep(0.5)

        processes = [master, *master.children()]
        assert len(processes) == WORKERS + 1
        memory = [p.memory_full_info() for p in processes]
        pss = sum(m.pss for m in memory) / MiB
        rss = sum(m.rss for m in memory) / MiB
        own = [round(m.uss / MiB) for m in memory[1:]]
        print(f"{WORKERS} idle workers and the master: PSS {pss:.0f} MiB, RSS sum {rss:.0f} MiB,")
        print(f"each worker's own (unshared) memory {own} MiB")
        assert pss < CEILING_MIB
        # Its control socket is in its own var folder, not ~/.gunicorn/ shared by every gunicorn.
        assert (tmp_path / "var" / "gunicorn.ctl").is_socket()
        # The configuration's logger class is the one that writes the access log: a query
        # string (a worklist search holds a patient's name) is not in it.
        assert _get(base + "/accounts/login/?q=DOE%5EJANE") == 200
        time.sleep(0.3)
        access = server.log.read_text()
        assert "/accounts/login/?[redacted]" in access and "DOE" not in access


def _get_quietly(url: str) -> int:
    try:
        return _get(url)
    except OSError:
        return 0
