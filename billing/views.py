"""Billing pages.

- `/facilities/<slug>/billing/`: the facility's plan, this month's usage against its allowance,
  the estimated bill, the courier comparison and its invoices. Admins of that facility only;
  anyone else gets a 404, like every facility page.
- `/facilities/<slug>/billing/invoices/<uuid>/` and `.../pdf/`: one invoice, for the
  facility's admins and for staff.
- `/billing/`, `/billing/usage.csv`, `/billing/invoices.csv`: the operator's dashboard and
  exports, staff only (404 for everyone else signed in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date, timedelta

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count, Sum
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from portal.access import AuthedRequest, get_membership_for_user
from portal.reauth import reauthentication_required

from .charts import Bar, bar_chart
from .conf import billing_currency, billing_tz
from .dashboard import (
    dashboard_data,
    invoices_csv_rows,
    this_month,
    usage_csv_rows,
    with_credited,
)
from .documents import invoice_parties
from .invoicing import invoice_month, month_is_over, previous_month
from .models import Invoice, UsageKind, UsageRecord
from .money import format_money
from .pdf import invoice_pdf
from .plans import ZERO, BillingError, bill_for, next_month


def _require_staff(request: HttpRequest) -> None:
    if not request.user.is_staff:
        raise Http404("No such page.")


def _get_invoice_for_user(request: AuthedRequest, slug: str, invoice_uuid: str) -> Invoice:
    """An invoice of facility `slug` that the user may read (its admins, staff); else 404."""
    invoice = (
        Invoice.objects.select_related("facility")
        .filter(uuid=invoice_uuid, facility__slug=slug)
        .first()
    )
    if invoice is None:
        raise Http404("No such invoice.")
    if not request.user.is_staff:
        get_membership_for_user(request, slug, manage=True)
    return invoice


# --- forms --------------------------------------------------------------------------------------


class MonthForm(forms.Form):
    month = forms.RegexField(regex=r"^\d{4}-(0[1-9]|1[0-2])$", required=False, help_text="YYYY-MM")

    def period(self) -> date:
        value = self.cleaned_data.get("month") if self.is_valid() else None
        if not value:
            return this_month()
        year, month = value.split("-")
        return date(int(year), int(month), 1)


class PeriodForm(forms.Form):
    """Any period, by days (billing time zone), both ends included."""

    start = forms.DateField(widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self) -> dict[str, object]:
        data = super().clean() or {}
        start, end = data.get("start"), data.get("end")
        if isinstance(start, date) and isinstance(end, date) and end < start:
            raise forms.ValidationError("The end comes before the start.")
        return data


# --- facility admins ------------------------------------------------------------------------------


@require_GET
@login_required
def facility_billing(request: AuthedRequest, slug: str) -> HttpResponse:
    facility = get_membership_for_user(request, slug, manage=True).facility
    period = this_month()
    bill = bill_for(facility=facility, period=period)
    today = timezone.now().astimezone(billing_tz()).date()
    plan = next(
        (s.plan for s in bill.segments if s.starts_on <= today <= s.ends_on), bill.segments[-1].plan
    )
    by_kind = {
        row["kind"]: row
        for row in UsageRecord.objects.filter(
            facility=facility, day__gte=period, day__lt=next_month(period)
        )
        .values("kind")
        .annotate(n=Count("pk"), b=Sum("bytes"), i=Sum("images"))
        .order_by()
    }
    kinds = [
        {"label": label, **by_kind[value]} for value, label in UsageKind.choices if value in by_kind
    ]
    invoices = list(with_credited(Invoice.objects.filter(facility=facility)).order_by("-period"))
    # What the facility was charged: invoice totals less credit notes.
    # The courier comparison is in the billing currency: invoices in another are not added in.
    compared = [i for i in invoices if i.currency == billing_currency()]
    charged = sum((i.balance for i in compared), ZERO)  # type: ignore[attr-defined]
    courier = sum((i.courier_cost for i in compared), ZERO)
    return render(
        request,
        "billing/facility_billing.html",
        {
            "facility": facility,
            "period": period,
            "plan": plan,
            "bill": bill,
            "kinds": kinds,
            "invoices": invoices,
            "invoiced_total": charged,
            "courier_total": courier,
            "saved_total": courier - charged,
            "billing_currency": billing_currency(),
            "tz": billing_tz(),
        },
    )


@require_GET
@login_required
def invoice_detail(request: AuthedRequest, slug: str, invoice_uuid: str) -> HttpResponse:
    invoice = _get_invoice_for_user(request, slug, invoice_uuid)
    notes = list(invoice.credit_notes.all())
    credited = sum((n.amount for n in notes), ZERO)
    return render(
        request,
        "billing/invoice_detail.html",
        {
            "invoice": invoice,
            "lines": list(invoice.lines.all()),
            "credit_notes": notes,
            "credited": credited,
            "balance": invoice.total - credited,
            "saved": invoice.courier_cost - invoice.total + credited,
            "parties": invoice_parties(invoice=invoice),
            "slug": slug,
        },
    )


@require_GET
@login_required
def invoice_pdf_download(request: AuthedRequest, slug: str, invoice_uuid: str) -> HttpResponse:
    invoice = _get_invoice_for_user(request, slug, invoice_uuid)
    body = invoice_pdf(
        invoice=invoice,
        lines=list(invoice.lines.all()),
        credit_notes=list(invoice.credit_notes.all()),
        parties=invoice_parties(invoice=invoice),
    )
    response = HttpResponse(body, content_type="application/pdf")
    response["Content-Disposition"] = f'attachment; filename="invoice-{invoice.number}.pdf"'
    response["Cache-Control"] = "private, no-store"
    return response


# --- staff ----------------------------------------------------------------------------------------


@require_GET
@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    _require_staff(request)
    month_form = MonthForm(request.GET or None)
    data = dashboard_data(month=month_form.period())
    currency = data.currency
    revenue_chart = bar_chart(
        title=f"Revenue per month ({currency})",
        category_axis="Month",
        value_axis=f"Revenue ({currency}): invoices less credit notes",
        tick=lambda value: format_money(value, currency),
        bars=[
            Bar(
                label=f"{m.period:%b %Y}",
                value=m.revenue,
                title=f"{m.period:%B %Y}: {format_money(m.revenue, currency)}"
                + (" (estimate so far)" if m.estimate is not None else ""),
                value_text=format_money(m.revenue, currency)
                + (" (est.)" if m.estimate is not None else ""),
                estimate=m.estimate is not None,
            )
            for m in data.months
        ],
    )
    gb_chart = bar_chart(
        title="GB delivered per month",
        category_axis="Month",
        value_axis="GB delivered (10⁹ bytes)",
        tick=lambda value: f"{value.normalize():f} GB",
        bars=[
            Bar(
                label=f"{m.period:%b %Y}",
                value=m.gb,
                title=f"{m.period:%B %Y}: {m.gb:,.3f} GB",
                value_text=f"{m.gb:,.3f} GB",
            )
            for m in data.months
        ],
    )
    first = data.month
    period_form = PeriodForm(initial={"start": first, "end": next_month(first) - timedelta(days=1)})
    issue_month = first if month_is_over(first) else previous_month()
    return render(
        request,
        "billing/dashboard.html",
        {
            "data": data,
            "month_form": month_form,
            "period_form": period_form,
            "revenue_chart": revenue_chart,
            "gb_chart": gb_chart,
            "previous": (first - timedelta(days=1)).replace(day=1),
            "following": next_month(first),
            # The month the "Issue invoices" button offers: the one shown if it has ended,
            # else the last one; and how many of its invoices exist already.
            "issue_month": issue_month,
            "issue_done": Invoice.objects.filter(period=issue_month).count(),
        },
    )


class IssueForm(forms.Form):
    month = forms.DateField(input_formats=["%Y-%m", "%Y-%m-%d"])


@require_POST
@login_required
@reauthentication_required
def invoices_issue(request: HttpRequest) -> HttpResponse:
    """The operator issues a month's invoices (what beat does on the 1st, and
    `manage.py invoice_month`): safe to press twice, facilities already invoiced are skipped."""
    _require_staff(request)
    form = IssueForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose a month to invoice (YYYY-MM).")
        return redirect("billing_dashboard")
    period = form.cleaned_data["month"].replace(day=1)
    try:
        run = invoice_month(year=period.year, month=period.month)
    except BillingError as exc:
        messages.error(request, f"No invoices issued: {exc}.")
    else:
        messages.success(
            request,
            f"{run.period:%B %Y}: {run.issued} invoice{'s' if run.issued != 1 else ''} issued, "
            f"{run.already} already issued, {run.empty} facilit{'y' if run.empty == 1 else 'ies'} "
            f"with nothing to invoice; {run.notified} e-mailed to the facilities' admins.",
        )
    return redirect(f"{reverse('billing_dashboard')}?month={period:%Y-%m}")


@require_GET
@login_required
def usage_csv(request: HttpRequest) -> HttpResponseBase:
    return _period_csv(request, "usage", usage_csv_rows)


@require_GET
@login_required
def invoices_csv(request: HttpRequest) -> HttpResponseBase:
    return _period_csv(request, "invoices", invoices_csv_rows)


def _period_csv(
    request: HttpRequest, name: str, rows: Callable[..., Iterator[str]]
) -> HttpResponseBase:
    """A staff CSV export of one period (start and end dates in the query), streamed."""
    _require_staff(request)
    form = PeriodForm(request.GET)
    if not form.is_valid():
        return _bad_period(form)
    start, end = form.cleaned_data["start"], form.cleaned_data["end"]
    response = StreamingHttpResponse(
        rows(start=start, end=end), content_type="text/csv; charset=utf-8"
    )
    response["Content-Disposition"] = f'attachment; filename="relay-{name}-{start}-{end}.csv"'
    return response


def _bad_period(form: PeriodForm) -> HttpResponse:
    errors = "; ".join(f"{k}: {' '.join(str(e) for e in v)}" for k, v in form.errors.items())
    return HttpResponse(
        f"Give the period as start=YYYY-MM-DD&end=YYYY-MM-DD ({errors})",
        status=400,
        content_type="text/plain; charset=utf-8",
    )
