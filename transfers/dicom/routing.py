"""Routing rules: studies a facility's PACS sends through the gateway, shared automatically.

A rule is applied once per study (the RoutedStudy row is unique per rule and study), when the
study is complete, i.e. after the quiet period with no new instances. The share is made in the
name of the admin who wrote the rule, so it is audited and can be revoked like any other; if
that person may no longer share (left the facility), the error is kept on the RoutedStudy row
and shown on the rules page.
"""

from __future__ import annotations

import logging

from django.db import IntegrityError, transaction

from ..models import RoutedStudy, RoutingRule, Share, ShareKind, Study
from ..sharing.services import ShareError, share_create

log = logging.getLogger(__name__)


def routing_apply(*, study: Study) -> list[Share]:
    """Share a complete gateway study by every matching active rule not yet applied to it."""
    shares: list[Share] = []
    if not study.received_from_ae or study.purged_at is not None:
        return shares
    rules = RoutingRule.objects.filter(facility_id=study.facility_id, active=True).select_related(
        "facility", "recipient_facility", "created_by"
    )
    for rule in rules:
        if not rule.matches(study):
            continue
        try:
            with transaction.atomic():
                routed = RoutedStudy.objects.create(rule=rule, study=study)
                try:
                    share, _ = share_create(
                        facility=rule.facility,
                        created_by=rule.created_by,
                        studies=[study],
                        kind=ShareKind.FACILITY if rule.recipient_facility else ShareKind.PHYSICIAN,
                        recipient_facility=rule.recipient_facility,
                        recipient_email=rule.recipient_email,
                        message=f"Sent automatically by a routing rule of {rule.facility.name}.",
                        can_download=rule.can_download,
                        can_import=rule.can_import,
                    )
                except ShareError as exc:
                    routed.error = str(exc)[:300]
                    routed.save(update_fields=["error"])
                    log.warning(
                        "routing rule %s could not share study %s: %s", rule.uuid, study.uuid, exc
                    )
                    continue
                routed.share = share
                routed.save(update_fields=["share"])
                shares.append(share)
        except IntegrityError:
            continue  # another worker applied this rule to this study first
    return shares
