"""`manage.py dicom_gateway`: the DICOM listener facilities' PACS send studies to."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from ...dicom.gateway import Gateway


class Command(BaseCommand):
    help = "Answer C-ECHO and C-STORE for every facility's AE title until stopped."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.DICOM_GATEWAY_BIND)
        parser.add_argument("--port", type=int, default=settings.DICOM_GATEWAY_PORT)
        parser.add_argument(
            "--tls-port",
            type=int,
            default=settings.DICOM_GATEWAY_TLS_PORT,
            help="DICOM TLS port, used when DICOM_TLS_CERTIFICATE and DICOM_TLS_KEY are set",
        )
        parser.add_argument("--ae-title", default=settings.DICOM_GATEWAY_AE_TITLE)

    def handle(self, *args: Any, **options: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        # pynetdicom logs every PDU at INFO; its warnings and errors are enough.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        tls = bool(settings.DICOM_TLS_CERTIFICATE) and options["tls_port"] > 0
        self.stdout.write(
            f"DICOM gateway {options['ae_title']} listening on {options['host']}:{options['port']}"
            + (f", with TLS on {options['tls_port']}" if tls else " (no TLS: no certificate set)")
            + " (facilities are called by their own AE titles)"
        )
        self.stdout.flush()
        try:
            Gateway(ae_title=options["ae_title"]).serve_forever(
                host=options["host"],
                port=options["port"],
                tls_port=options["tls_port"] if tls else None,
            )
        except KeyboardInterrupt:
            pass
