"""Server-rendered SVG bar charts for the billing dashboard: no JavaScript, no build step.

Each bar carries a <title> (the exact figure, shown on hover and read by screen readers) and
the chart has a text table next to it in the template, so nothing depends on seeing the SVG.
Heights are computed with Decimal and rounded to whole pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

WIDTH = 640
HEIGHT = 220
TOP = 20
BOTTOM = 30  # room for the month labels
LEFT = 8


@dataclass(frozen=True)
class Bar:
    label: str  # under the bar, e.g. "Mar"
    value: Decimal
    title: str  # the exact figure, e.g. "March 2025: 1,234.50 USD"
    estimate: bool = False  # drawn lighter: a month still running


def bar_chart(*, title: str, bars: list[Bar]) -> SafeString:
    """An accessible SVG bar chart of non-negative values."""
    plot = HEIGHT - TOP - BOTTOM
    top = max((bar.value for bar in bars), default=Decimal(0))
    slot = Decimal(WIDTH - 2 * LEFT) / max(len(bars), 1)
    width = int(slot * Decimal("0.7"))
    rects = []
    for index, bar in enumerate(bars):
        height = 0
        if top > 0 and bar.value > 0:
            height = max(1, int((bar.value * plot / top).to_integral_value(ROUND_HALF_UP)))
        x = int(LEFT + slot * index + (slot - width) / 2)
        rects.append(
            (
                "bar estimate" if bar.estimate else "bar",
                x,
                TOP + plot - height,
                width,
                height,
                bar.title,
                x + width // 2,
                HEIGHT - BOTTOM + 16,
                bar.label,
            )
        )
    body = format_html_join(
        "",
        '<g><rect class="{}" x="{}" y="{}" width="{}" height="{}"><title>{}</title></rect>'
        '<text x="{}" y="{}" text-anchor="middle">{}</text></g>',
        rects,
    )
    return format_html(
        '<svg class="chart" viewBox="0 0 {} {}" role="img" aria-label="{}"'
        ' xmlns="http://www.w3.org/2000/svg"><title>{}</title>'
        '<line class="axis" x1="{}" y1="{}" x2="{}" y2="{}"/>{}</svg>',
        WIDTH,
        HEIGHT,
        title,
        title,
        LEFT,
        HEIGHT - BOTTOM,
        WIDTH - LEFT,
        HEIGHT - BOTTOM,
        body,
    )
