"""`manage.py dicom_gateway`: the DICOM listener facilities' PACS send studies to."""

from __future__ import annotations

import logging
import sys
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...dicom.gateway import gateway_serve


class Command(BaseCommand):
    help = (
        "Answer C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET and storage commitment for every "
        "facility's AE title until stopped (SIGTERM: let running associations finish; "
        "SIGINT/SIGQUIT: abort them)."
    )

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
        parser.add_argument(
            "--processes",
            type=int,
            default=settings.DICOM_GATEWAY_PROCESSES,
            help="processes sharing the port(s), for concurrent associations on several cores "
            "(default DICOM_GATEWAY_PROCESSES, 1)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(message)s"
        )
        # pynetdicom logs every PDU at INFO; its warnings and errors are enough.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        processes = options["processes"]
        if processes < 1:
            raise CommandError("--processes must be 1 or more")
        tls = bool(settings.DICOM_TLS_CERTIFICATE) and options["tls_port"] > 0
        self.stdout.write(
            f"DICOM gateway {options['ae_title']} listening on {options['host']}:{options['port']}"
            + (f", with TLS on {options['tls_port']}" if tls else " (no TLS: no certificate set)")
            + (f", {processes} processes" if processes > 1 else "")
            + " (facilities are called by their own AE titles)"
        )
        self.stdout.flush()
        status = gateway_serve(
            host=options["host"],
            port=options["port"],
            tls_port=options["tls_port"] if tls else None,
            ae_title=options["ae_title"],
            processes=processes,
        )
        if status:
            sys.exit(status)
