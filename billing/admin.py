"""Billing in the Django admin: staff edit plans and plan assignments, read usage, mark
invoices paid and issue credit notes. Invoices and credit notes are never edited here."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from .invoicing import credit_note_issue, invoice_credited, invoice_mark_paid
from .models import CreditNote, Invoice, InvoiceLine, Plan, PlanAssignment, UsageRecord
from .money import format_money


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "kind",
        "currency",
        "price_per_image",
        "price_per_gb",
        "monthly_fee",
        "included_gb",
        "overage_per_gb",
        "is_default",
    )
    list_filter = ("kind", "is_default")
    search_fields = ("name",)
    fieldsets = (
        (None, {"fields": ("name", "kind", "currency", "is_default")}),
        ("Pay as you go", {"fields": ("price_per_image", "price_per_gb")}),
        ("Subscription", {"fields": ("monthly_fee", "included_gb", "overage_per_gb")}),
    )


@admin.register(PlanAssignment)
class PlanAssignmentAdmin(admin.ModelAdmin):
    """Model.clean refuses overlapping assignments; a price change of a plan applies to every
    month not yet invoiced, so to change a price from a date, assign a new plan from it."""

    list_display = ("facility", "plan", "starts_on", "ends_on")
    list_filter = ("plan",)
    search_fields = ("facility__name", "facility__slug")
    autocomplete_fields = ("facility",)
    date_hierarchy = "starts_on"


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = ("at", "day", "facility", "kind", "bytes", "images", "user")
    list_filter = ("kind", "day")
    search_fields = ("facility__name", "key")
    list_select_related = ("facility", "user")
    show_full_result_count = False  # a COUNT over a million rows per page view is not needed

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class InvoiceLineInline(admin.TabularInline):
    model = InvoiceLine
    extra = 0
    fields = ("position", "description", "quantity", "unit", "unit_price", "amount")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class CreditNoteInline(admin.TabularInline):
    model = CreditNote
    extra = 0
    fields = ("number", "amount", "currency", "reason", "issued_at", "issued_by")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Invoice)
class InvoiceAdmin(admin.ModelAdmin):
    list_display = ("number", "facility_name", "period", "total", "currency", "paid_at")
    list_filter = ("period", ("paid_at", admin.EmptyFieldListFilter))
    search_fields = ("number", "facility_name")
    inlines = (InvoiceLineInline, CreditNoteInline)
    actions = ("mark_paid",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # issued invoices are final; staff view them and mark them paid

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Mark the selected invoices paid")
    def mark_paid(self, request: HttpRequest, queryset: QuerySet[Invoice]) -> None:
        count = sum(invoice_mark_paid(invoice=invoice) for invoice in queryset)
        self.message_user(request, f"{count} invoice(s) marked paid.", messages.SUCCESS)


class CreditNoteForm(forms.ModelForm):
    class Meta:
        model = CreditNote
        fields = ("invoice", "amount", "reason")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        invoice, amount = data.get("invoice"), data.get("amount")
        if invoice is not None and amount is not None:
            left = invoice.total - invoice_credited(invoice)
            if amount > left:
                raise forms.ValidationError(
                    f"At most {format_money(left, invoice.currency)} of this invoice can still"
                    " be credited."
                )
        return data


@admin.register(CreditNote)
class CreditNoteAdmin(admin.ModelAdmin):
    form = CreditNoteForm
    list_display = ("number", "invoice", "amount", "currency", "issued_at", "issued_by")
    search_fields = ("number", "invoice__number")
    raw_id_fields = ("invoice",)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: CreditNote, form: Any, change: bool) -> None:
        # Through the service, which numbers the note and re-checks the amount under a lock.
        note = credit_note_issue(
            invoice=obj.invoice,
            amount=obj.amount,
            reason=obj.reason,
            by=request.user if request.user.is_authenticated else None,  # type: ignore[arg-type]
        )
        obj.pk, obj.number, obj.uuid = note.pk, note.number, note.uuid
