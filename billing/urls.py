"""Billing URLs: the facility admin's billing page and invoices, the staff dashboard and CSVs.

relay/urls.py includes these with `path("", include("billing.urls"))`.
"""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("billing/", views.dashboard, name="billing_dashboard"),
    path("billing/invoices/issue/", views.invoices_issue, name="billing_invoices_issue"),
    path("billing/usage.csv", views.usage_csv, name="billing_usage_csv"),
    path("billing/invoices.csv", views.invoices_csv, name="billing_invoices_csv"),
    path("facilities/<slug:slug>/billing/", views.facility_billing, name="facility_billing"),
    path(
        "facilities/<slug:slug>/billing/invoices/<uuid:invoice_uuid>/",
        views.invoice_detail,
        name="invoice_detail",
    ),
    path(
        "facilities/<slug:slug>/billing/invoices/<uuid:invoice_uuid>/pdf/",
        views.invoice_pdf_download,
        name="invoice_pdf",
    ),
]
