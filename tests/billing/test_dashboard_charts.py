"""The staff dashboard's charts: both axes drawn and titled, and every bar's value written out."""

from __future__ import annotations

import re
from datetime import date

from billing.invoicing import invoice_month
from portal.models import Facility, User
from tests.billing.factories import deliver, local
from tests.helpers import client_for

GB = 10**9


def test_the_dashboard_charts_have_axes_labels_and_values(operator: User, gfc: Facility) -> None:
    deliver(gfc, nbytes=3 * GB, at=local(date(2025, 3, 2)))
    invoice_month(year=2025, month=3)
    html = client_for(operator).get("/billing/?month=2025-03").content.decode()
    revenue, volume = re.findall(r'<svg class="chart".*?</svg>', html, re.S)
    for chart in (revenue, volume):
        assert chart.count('class="axis"') >= 2  # both axes drawn
        assert ">Month</text>" in chart
        assert re.search(r'class="category"[^>]*>Mar 2025</text>', chart)
    assert "Revenue (USD)" in revenue
    assert re.search(r'class="value"[^>]*>USD 3.00</text>', revenue)
    assert re.search(r'class="value"[^>]*>USD 0.00</text>', revenue)  # a month with no usage
    assert re.search(r'class="tick"[^>]*>USD 0.00</text>', revenue)
    assert re.search(r'class="tick"[^>]*>USD 5.00</text>', revenue)  # 3.00 rounded up
    assert "GB delivered" in volume
    assert re.search(r'class="value"[^>]*>3.000 GB</text>', volume)


def test_the_dashboard_tables_show_money_in_its_currency(operator: User, gfc: Facility) -> None:
    deliver(gfc, nbytes=3 * GB, at=local(date(2025, 3, 2)))
    invoice_month(year=2025, month=3)
    html = client_for(operator).get("/billing/?month=2025-03").content.decode()
    assert '<td class="money">USD 3.00</td>' in html
    assert "1 invoice, USD 3.00 due" in html
