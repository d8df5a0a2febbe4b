"""Server-rendered SVG bar charts for the billing dashboard: no JavaScript, no build step.

The bars run horizontally, one row per month, so that every bar can carry its value written
out at its end ("USD 1,234.50" does not fit under a narrow vertical bar). Both axes are drawn
and titled: the months down the left, the value axis along the bottom with ticks at zero, half
and the (rounded up) top. Each bar also has a <title> (the exact figure, shown on hover and
read by screen readers), and the template has a text table next to the chart. No inline style
(the CSP forbids it): the look comes from classes in static/css/billing.css and SVG
presentation attributes. Geometry is computed with Decimal and rounded to whole pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

WIDTH = 640
LEFT = 78  # month labels
RIGHT = 140  # room for the value written after the longest bar ("USD 12,345.67 (est.)")
TOP = 26  # the month axis title
ROW = 22
BOTTOM = 46  # tick labels and the value axis title
PLOT = WIDTH - LEFT - RIGHT


@dataclass(frozen=True)
class Bar:
    label: str  # beside the bar, e.g. "Mar 2025"
    value: Decimal
    title: str  # the exact figure, e.g. "March 2025: USD 1,234.50"
    value_text: str = ""  # written at the bar's end; the value itself when blank
    estimate: bool = False  # drawn lighter: a month still running


def nice_ceiling(value: Decimal) -> Decimal:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `value` (> 0)."""
    exponent = value.adjusted()
    for _ in range(2):
        for step in (Decimal(1), Decimal(2), Decimal("2.5"), Decimal(5)):
            candidate = step.scaleb(exponent)
            if candidate >= value:
                return candidate
        exponent += 1
    return Decimal(10).scaleb(exponent)


def bar_chart(
    *,
    title: str,
    bars: list[Bar],
    category_axis: str,
    value_axis: str,
    tick: Callable[[Decimal], str] = str,
) -> SafeString:
    """An accessible SVG bar chart of non-negative values, with titled axes and each bar's
    value written beside it. `tick` formats the value axis's tick labels."""
    largest = max((bar.value for bar in bars), default=Decimal(0))
    top = nice_ceiling(largest) if largest > 0 else Decimal(1)
    plot_bottom = TOP + ROW * max(len(bars), 1)
    height = plot_bottom + BOTTOM
    rows = []
    for index, bar in enumerate(bars):
        length = 0
        if bar.value > 0:
            length = max(1, int((bar.value * PLOT / top).to_integral_value(ROUND_HALF_UP)))
        y = TOP + ROW * index
        rows.append(
            (
                LEFT - 6,
                y + ROW // 2 + 4,
                bar.label,
                "bar estimate" if bar.estimate else "bar",
                LEFT,
                y + 4,
                length,
                ROW - 8,
                bar.title,
                LEFT + length + 4,
                y + ROW // 2 + 4,
                bar.value_text or str(bar.value),
            )
        )
    body = format_html_join(
        "",
        '<g><text class="category" x="{}" y="{}" text-anchor="end">{}</text>'
        '<rect class="{}" x="{}" y="{}" width="{}" height="{}"><title>{}</title></rect>'
        '<text class="value" x="{}" y="{}">{}</text></g>',
        rows,
    )
    ticks = format_html_join(
        "",
        '<line class="axis" x1="{}" y1="{}" x2="{}" y2="{}"/>'
        '<text class="tick" x="{}" y="{}" text-anchor="{}">{}</text>',
        (
            (x, plot_bottom, x, plot_bottom + 4, x, plot_bottom + 16, anchor, tick(value))
            for value, x, anchor in (
                (Decimal(0), LEFT, "start"),
                (top / 2, LEFT + PLOT // 2, "middle"),
                (top, LEFT + PLOT, "end"),
            )
        ),
    )
    return format_html(
        '<svg class="chart" viewBox="0 0 {} {}" role="img" aria-label="{}"'
        ' xmlns="http://www.w3.org/2000/svg" font-size="11"><title>{}</title>'
        '<text class="axis-label" x="{}" y="{}" text-anchor="end" font-weight="bold">{}</text>'
        '<line class="axis" x1="{}" y1="{}" x2="{}" y2="{}"/>'
        '<line class="axis" x1="{}" y1="{}" x2="{}" y2="{}"/>{}{}'
        '<text class="axis-label" x="{}" y="{}" text-anchor="middle" font-weight="bold">{}</text>'
        "</svg>",
        WIDTH,
        height,
        title,
        title,
        LEFT - 6,
        TOP - 10,
        category_axis,
        LEFT,
        TOP,
        LEFT,
        plot_bottom,
        LEFT,
        plot_bottom,
        LEFT + PLOT,
        plot_bottom,
        body,
        ticks,
        LEFT + PLOT // 2,
        plot_bottom + 36,
        value_axis,
    )
