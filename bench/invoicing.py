"""The billing benchmark: invoicing a month for 1,000 facilities with 1,000,000 usage rows on
PostgreSQL, and the billing pages' response times on that data (issue 6).

Runs in its own throwaway PostgreSQL database (relay_bench_billing on the server of
DATABASE_URL, or 127.0.0.1:5432 as user postgres), migrated from scratch, filled with COPY by
`bench/billing_data.py` (`billing_bench`), and dropped afterwards. There is no peer: the figures are
compared with the issue's aims (a month invoiced in under a minute, the dashboard under 500 ms).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from measure import aim_table
from servers import psql_admin, scratch_database_url

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
DB_NAME = "relay_bench_billing"

SCRIPT = """
import json, sys, django
sys.path.insert(0, "bench")
from relay.embedded import var_prepare
var_prepare()
django.setup()
from dataclasses import asdict
from billing_data import billing_bench
result = billing_bench(facilities={facilities}, rows={rows})
print("BILLING-BENCH " + json.dumps(asdict(result)))
"""


def billing_section(*, facilities: int = 1000, rows: int = 1_000_000) -> dict[str, Any]:
    url = scratch_database_url(DB_NAME)
    psql_admin(url, f"DROP DATABASE IF EXISTS {DB_NAME}")
    psql_admin(url, f"CREATE DATABASE {DB_NAME}")
    var = tempfile.mkdtemp(prefix="relay-bench-billing-")
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "DJANGO_SETTINGS_MODULE": "relay.settings",
        # Its own folder: the 1,000 invoice e-mails queue into a broker that is thrown away.
        "RELAY_VAR_DIR": var,
        "ALLOWED_HOSTS": "testserver",
    }
    env.pop("REDIS_URL", None)
    try:
        subprocess.run(
            [str(PYTHON), "manage.py", "migrate", "--noinput"],
            cwd=REPO, env=env, check=True, capture_output=True,
        )  # fmt: skip
        done = subprocess.run(
            [str(PYTHON), "-c", SCRIPT.format(facilities=facilities, rows=rows)],
            cwd=REPO, env=env, check=False, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"billing_bench failed:\n{done.stderr[-3000:]}")
    finally:
        psql_admin(url, f"DROP DATABASE IF EXISTS {DB_NAME}")
        shutil.rmtree(var, ignore_errors=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("BILLING-BENCH "))
    return dict(json.loads(line.removeprefix("BILLING-BENCH ")))


def billing_table(result: dict[str, Any]) -> str:
    fill = result["fill"]
    rows = [
        ("usage rows / facilities", f"{fill['rows']:,} / {fill['facilities']:,}", ""),
        ("fill (COPY), s", f"{fill['seconds']:.1f}", ""),
        ("invoice_month, s", f"{result['invoice_seconds']:.2f}", "< 60 s"),
        ("invoices issued", f"{result['invoices']:,}", ""),
        ("second run (issues nothing), s", f"{result['rerun_seconds']:.2f}", ""),
        (
            "staff dashboard, median / max of 5, ms",
            f"{statistics.median(result['dashboard_ms']):.0f} / {max(result['dashboard_ms']):.0f}",
            "< 500 ms",
        ),
        (
            "facility billing page, median / max of 5, ms",
            f"{statistics.median(result['facility_page_ms']):.0f} / "
            f"{max(result['facility_page_ms']):.0f}",
            "",
        ),
    ]
    return aim_table("billing on PostgreSQL", rows)
