"""The viewer's first image (issue 17, item 5): what the page asks for, in which order.

Times belong in the benchmark (bench/viewer.py, section 7); these tests check the structure that
makes the first image quick, in counts and orders a person can read in the browser's Network and
Performance panels: the first frame is requested with the page, before the stylesheet and the
viewer's modules; every module is announced in the page (no waterfall of imports); nothing but
the one stylesheet blocks rendering; and until the first image is drawn the page asks the server
for nothing else (no neighbouring frames, no thumbnails, no geometry.json), so that image never
waits behind them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from playwright.sync_api import expect

from portal.models import Facility, Membership, User
from relay.management.commands.seed_demo import demo_ct_series
from transfers.ingest import instance_ingest
from transfers.models import Study

pytestmark = pytest.mark.django_db(transaction=True)

LOAD_TIMEOUT = 60_000  # the live server decodes the first frames on demand
VIEWER_JS = Path(__file__).resolve().parents[2] / "static" / "js" / "viewer"

# Every resource the page fetched, in the order the browser started them, and the viewer's marks.
TIMELINE_JS = """
() => ({
  resources: performance.getEntriesByType('resource')
    .map((r) => ({ path: new URL(r.name).pathname, start: r.startTime, end: r.responseEnd }))
    .sort((a, b) => a.start - b.start),
  marks: Object.fromEntries(performance.getEntriesByType('mark')
    .filter((m) => m.name.startsWith('relay-viewer:')).map((m) => [m.name.slice(13), m.startTime])),
})
"""


@pytest.fixture
def study(transactional_db: None, e2e_storage: Path) -> tuple[Study, User]:
    facility = Facility.objects.create(name="St. Luke Community Healthcare", slug="stluke")
    user = User.objects.create_user(email="reader@stluke.example", password="first image 12")
    Membership.objects.create(user=user, facility=facility, role="sender")
    files = demo_ct_series(12)
    for data in files:
        assert instance_ingest(facility=facility, user=user, chunks=[data]).status == "stored"
    return Study.objects.get(facility=facility), user


def _signed_in_page(page: Any, user: User, live_server: Any) -> Any:
    client = Client()
    client.force_login(user)
    cookie = client.cookies["sessionid"]
    page.context.add_cookies([{"name": "sessionid", "value": cookie.value, "url": live_server.url}])
    return page


def _head(study: Study, user: User) -> tuple[str, str]:
    """The page's <head> and the first frame's address, as the server sends them."""
    client = Client()
    client.force_login(user)
    html = client.get(f"/studies/{study.uuid}/view/").content.decode()
    head = html.split("</head>", 1)[0]
    first_uid = (
        study.series.get()
        .instances.order_by("instance_number")
        .values_list("sop_instance_uid", flat=True)
        .first()
    )
    return head, f"/studies/{study.uuid}/view/frames/{first_uid}/0/"


def test_the_first_frame_is_the_first_request_of_the_page_and_every_module_is_announced(
    study: tuple[Study, User],
) -> None:
    the_study, user = study
    head, frame_url = _head(the_study, user)
    # Tags that make the browser fetch something, in the order the page names them.
    fetching = re.findall(r"<(link|script)\b([^>]*)>", head)
    first_tag, first_attrs = fetching[0]
    assert first_tag == "link" and 'rel="preload"' in first_attrs, fetching[0]
    assert f'href="{frame_url}"' in first_attrs
    assert 'as="fetch"' in first_attrs and 'crossorigin="anonymous"' in first_attrs
    assert 'fetchpriority="high"' in first_attrs

    # Render-blocking in <head>: the one stylesheet, and no script at all.
    stylesheets = [a for t, a in fetching if t == "link" and 'rel="stylesheet"' in a]
    assert len(stylesheets) == 1 and "viewer" in stylesheets[0]
    assert [a for t, a in fetching if t == "script"] == []

    # Every module of the viewer is preloaded by the page, not found one import at a time.
    preloaded = set(re.findall(r'rel="modulepreload" href="[^"]*/js/viewer/([\w.]+?)\.js"', head))
    assert preloaded == {path.stem for path in VIEWER_JS.glob("*.js")}


def test_until_the_first_image_is_drawn_the_page_asks_for_nothing_else(
    e2e_page: Any, e2e_js_errors: list[str], study: tuple[Study, User], live_server: Any
) -> None:
    the_study, user = study
    page = _signed_in_page(e2e_page, user, live_server)
    answer = page.goto(f"{live_server.url}/studies/{the_study.uuid}/view/")
    assert answer.status == 200
    viewport = page.locator("#vp0")
    expect(viewport).to_have_attribute("data-drawn-index", "0", timeout=LOAD_TIMEOUT)
    expect(viewport).to_have_attribute("data-loaded", "12", timeout=LOAD_TIMEOUT)
    expect(page.locator("#viewer")).to_have_attribute("data-geometry", "ready")
    expect(page.locator(".thumb img")).to_have_attribute("src", re.compile("/thumbs/"))
    timeline = page.evaluate(TIMELINE_JS)
    marks, resources = timeline["marks"], timeline["resources"]

    # The page's own timeline: main.js ran, the first values arrived, then the first draw.
    assert list(marks) == ["start", "decoded", "drawn"], marks
    assert marks["start"] <= marks["decoded"] <= marks["drawn"]

    frames = [r for r in resources if "/frames/" in r["path"]]
    first = frames[0]
    _, frame_url = _head(the_study, user)
    assert first["path"] == frame_url
    # Asked for once: the viewer's fetch() took the page's preload, not a second download.
    assert [r["path"] for r in frames].count(frame_url) == 1
    assert len(frames) == 12
    # The first frame went out with the page, before the viewer's code had even arrived.
    main_js = next(r for r in resources if re.search(r"/js/viewer/main(\.\w+)?\.js$", r["path"]))
    assert first["start"] <= main_js["start"]
    assert first["start"] < main_js["end"]

    # Nothing else of the study was asked for before the first image was drawn.
    drawn = marks["drawn"]
    before = [r["path"] for r in resources if r["start"] < drawn and "/view/" in r["path"]]
    assert before == [frame_url], before
    later = [r["path"] for r in resources if r["start"] >= drawn]
    assert sum("/frames/" in p for p in later) == 11
    assert sum(p.endswith("/geometry.json") for p in later) == 1
    assert sum("/thumbs/" in p for p in later) == 1
    assert e2e_js_errors == []
