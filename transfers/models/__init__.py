"""The models of transfers, one module per feature; every model is importable from here.

Django finds models by importing this package, so each module is imported below, and their
names are re-exported so that `from transfers.models import Study` works from anywhere.
"""

from __future__ import annotations

from .deidentify import ORIGINALS, CopyStatus, DeidentifiedCopy
from .dicom import PacsDestination, Push, PushInstance, PushStatus, RoutedStudy, RoutingRule
from .expected import ExpectedInstance
from .media import ExportStatus, MediaExport
from .sharing import NotifyStatus, SecondFactor, Share, ShareEvent, ShareEventKind, ShareKind
from .studies import (
    UID_BATCH,
    Instance,
    InstanceQuerySet,
    Report,
    Series,
    Study,
    StudyStatus,
    person_name_display,
)

__all__ = [
    "ORIGINALS",
    "UID_BATCH",
    "CopyStatus",
    "DeidentifiedCopy",
    "ExpectedInstance",
    "ExportStatus",
    "Instance",
    "InstanceQuerySet",
    "MediaExport",
    "NotifyStatus",
    "PacsDestination",
    "Push",
    "PushInstance",
    "PushStatus",
    "Report",
    "RoutedStudy",
    "RoutingRule",
    "SecondFactor",
    "Series",
    "Share",
    "ShareEvent",
    "ShareEventKind",
    "ShareKind",
    "Study",
    "StudyStatus",
    "person_name_display",
]
