"""Production static files: after `manage.py collectstatic` (README: production set-up) pages
name content-hashed files, which are served compressed and cached for good.

Found by the operator run of issue 18 on main: collectstatic copied 132 files without a
manifest, so pages named the plain files, served uncompressed with `max-age=60`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.server_process import relay_run

PAGE = r"""
import json

import django

django.setup()
from django.test.utils import setup_test_environment

setup_test_environment()  # the test client's host is allowed
from django.test import Client

client = Client()
page = client.get("/accounts/login/").content.decode()
links = sorted(set(__import__("re").findall(r'/static/[^"\s]+\.css', page)))
answers = {}
for link in links:
    answer = client.get(link, HTTP_ACCEPT_ENCODING="gzip")
    body = b"".join(answer.streaming_content) if answer.streaming else answer.content
    answers[link] = {
        "status": answer.status_code,
        "cache": answer.get("Cache-Control", ""),
        "encoding": answer.get("Content-Encoding", ""),
        "bytes": len(body),
    }
print("RESULT " + json.dumps(answers))
"""


def test_collected_static_files_are_hashed_compressed_and_cached_for_good(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'relay.sqlite3'}"

    def run(args: list[str]) -> str:
        return relay_run(tmp_path, args, database_url=database, env={"DEBUG": "0"})

    run(["manage.py", "migrate", "--verbosity", "0"])
    run(["manage.py", "collectstatic", "--noinput", "--verbosity", "0"])
    manifest = json.loads((tmp_path / "var" / "static" / "staticfiles.json").read_text())
    assert manifest["paths"]["css/relay.css"] != "css/relay.css"

    line = next(ln for ln in run(["-c", PAGE]).splitlines() if ln.startswith("RESULT "))
    answers = json.loads(line.removeprefix("RESULT "))
    assert answers, "the sign-in page names no stylesheet"
    for link, answer in answers.items():
        assert re.search(r"\.[0-9a-f]{12}\.css$", link), f"{link} is not a hashed name"
        assert answer["status"] == 200, (link, answer)
        assert "immutable" in answer["cache"] and "max-age=315360000" in answer["cache"], answer
        assert answer["encoding"] == "gzip", (link, answer)
