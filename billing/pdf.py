"""A small PDF writer for invoices: text and rules on A4/Letter pages, no dependency.

No PDF library is installed, and an invoice needs little: lines of text in the standard
Helvetica and Courier fonts (every PDF reader has them, so nothing is embedded), right-aligned
amounts (Courier is monospaced, so its widths are known) and horizontal rules. Text is encoded
as WinAnsi (Latin-1 for what an invoice says); anything outside it becomes "?". The file is
PDF 1.4 with a correct cross-reference table, checked in the tests by parsing it and, when
Ghostscript is installed, by rendering it to text.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import TYPE_CHECKING

from django.template.defaultfilters import pluralize

from .documents import quantity_text
from .money import format_money, format_price

if TYPE_CHECKING:
    from .documents import InvoiceParties
    from .models import CreditNote, Invoice, InvoiceLine

PAGE_WIDTH = 595  # A4 in points; fits Letter's width too (612)
PAGE_HEIGHT = 842
MARGIN = 50
COURIER_ADVANCE = 0.6  # Courier glyphs are 600/1000 em wide


@dataclass
class Page:
    ops: list[str] = field(default_factory=list)


class Document:
    """Lay text out top to bottom, starting new pages as needed."""

    def __init__(self) -> None:
        self.pages: list[Page] = [Page()]
        self.y: float = PAGE_HEIGHT - MARGIN

    def _room(self, height: float) -> None:
        if self.y - height < MARGIN:
            self.pages.append(Page())
            self.y = PAGE_HEIGHT - MARGIN

    def text(self, value: str, *, x: float = MARGIN, size: float = 10, bold: bool = False) -> None:
        """One line of text at the cursor, then move down."""
        self._room(size * 1.5)
        self._put(value, x=x, y=self.y - size, size=size, font="F2" if bold else "F1")
        self.y -= size * 1.5

    def row(self, cells: list[tuple[str, float, str]], *, size: float = 9) -> None:
        """One table row: (text, x, align) with align "l" (Helvetica, from x) or "r" (Courier,
        ending at x)."""
        self._room(size * 1.6)
        baseline = self.y - size
        for value, x, align in cells:
            if align == "r":
                width = len(value) * size * COURIER_ADVANCE
                self._put(value, x=x - width, y=baseline, size=size, font="F3")
            else:
                self._put(value, x=x, y=baseline, size=size, font="F1")
        self.y -= size * 1.6

    def rule(self) -> None:
        self._room(6)
        y = self.y - 3
        self.pages[-1].ops.append(f"0.5 w {MARGIN} {y:.1f} m {PAGE_WIDTH - MARGIN} {y:.1f} l S")
        self.y -= 6

    def space(self, height: float = 8) -> None:
        self.y -= height

    def _put(self, value: str, *, x: float, y: float, size: float, font: str) -> None:
        self.pages[-1].ops.append(
            f"BT /{font} {size:g} Tf {x:.1f} {y:.1f} Td ({_escape(value)}) Tj ET"
        )

    def render(self) -> bytes:
        return pdf_bytes([page.ops for page in self.pages])


def _escape(value: str) -> str:
    encoded = value.encode("cp1252", errors="replace").decode("latin-1")
    out = []
    for char in encoded:
        if char in "()\\":
            out.append("\\" + char)
        elif ord(char) < 32:
            out.append(" ")
        elif ord(char) > 126:
            out.append(f"\\{ord(char):03o}")
        else:
            out.append(char)
    return "".join(out)


def pdf_bytes(pages: list[list[str]]) -> bytes:
    """Assemble a PDF from each page's content-stream operators."""
    fonts = {"F1": "Helvetica", "F2": "Helvetica-Bold", "F3": "Courier"}
    objects: list[bytes] = []  # object n is objects[n - 1]

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog = add(b"")  # filled in once the page tree's number is known
    tree = add(b"")
    font_ids = {
        name: add(
            f"<< /Type /Font /Subtype /Type1 /BaseFont /{base} "
            "/Encoding /WinAnsiEncoding >>".encode()
        )
        for name, base in fonts.items()
    }
    resources = " ".join(f"/{name} {number} 0 R" for name, number in font_ids.items())
    kids = []
    for ops in pages:
        stream = "\n".join(ops).encode("latin-1")
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        kids.append(
            add(
                f"<< /Type /Page /Parent {tree} 0 R /MediaBox [0 0 {PAGE_WIDTH} {PAGE_HEIGHT}] "
                f"/Resources << /Font << {resources} >> >> /Contents {content} 0 R >>".encode()
            )
        )
    objects[catalog - 1] = f"<< /Type /Catalog /Pages {tree} 0 R >>".encode()
    objects[tree - 1] = (
        f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    ).encode()

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        catalog,
        xref,
    )
    return bytes(out)


def invoice_pdf(
    *,
    invoice: Invoice,
    lines: list[InvoiceLine],
    credit_notes: list[CreditNote],
    parties: InvoiceParties,
) -> bytes:
    """The invoice as a PDF: the same figures and parties as its HTML page."""
    doc = Document()
    right = PAGE_WIDTH - MARGIN
    currency = invoice.currency
    doc.text(parties.seller_name, size=16, bold=True)
    for address_line in parties.seller_address:
        doc.text(address_line, size=9)
    if parties.seller_tax_id:
        doc.text(f"Tax ID: {parties.seller_tax_id}", size=9)
    doc.space()
    doc.text(f"Invoice {invoice.number}", size=14, bold=True)
    doc.text(f"Invoice number: {invoice.number}")
    doc.text(f"Invoice date: {_day(parties.issued_on)}")
    doc.text(f"Due date: {_day(parties.due_on)}", bold=True)
    doc.text(f"Payment terms: {parties.terms}")
    doc.text(f"Billing period: {invoice.period:%B %Y}")
    doc.text("Paid" if invoice.paid_at else "Unpaid", bold=True)
    doc.space()
    doc.text("Bill to", bold=True)
    doc.text(parties.bill_to_name)
    for address_line in parties.bill_to_address:
        doc.text(address_line)
    doc.space()
    doc.row(
        [
            ("Description", MARGIN, "l"),
            ("Quantity", 370, "r"),
            ("Unit price", 455, "r"),
            ("Amount", right, "r"),
        ]
    )
    doc.rule()
    for line in lines:
        wrapped = textwrap.wrap(line.description, 55) or [""]
        doc.row(
            [
                (wrapped[0], MARGIN, "l"),
                (quantity_text(line.quantity, line.unit), 370, "r"),
                (format_price(line.unit_price, currency), 455, "r"),
                (format_money(line.amount, currency), right, "r"),
            ]
        )
        for more in wrapped[1:]:
            doc.row([(more, MARGIN + 10, "l")])
    doc.rule()
    doc.row([("Total", MARGIN, "l"), (format_money(invoice.total, currency), right, "r")])
    credited = sum((note.amount for note in credit_notes), Decimal("0"))
    for note in credit_notes:
        doc.row(
            [
                (f"Credit note {note.number}: {note.reason}"[:80], MARGIN, "l"),
                (format_money(-note.amount, note.currency), right, "r"),
            ]
        )
    if credit_notes:
        doc.row(
            [
                ("Balance", MARGIN, "l"),
                (format_money(invoice.total - credited, currency), right, "r"),
            ]
        )
    doc.space()
    studies = f"{invoice.studies} stud{pluralize(invoice.studies, 'y,ies')}"
    summary = f"{studies} delivered."
    if invoice.courier_cost:
        summary += (
            f" By courier CD they would have cost {format_money(invoice.courier_cost, currency)};"
            f" you paid {format_money(invoice.total - credited, currency)}."
        )
    doc.text(summary, size=9)
    doc.text(f"Please quote the invoice number {invoice.number} with your payment.", size=9)
    return doc.render()


def _day(day: date) -> str:
    return f"{day:%B} {day.day}, {day.year}"
