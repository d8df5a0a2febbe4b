"""Who is on the other end of one gateway association, once it was let in (gateway.caller_admit).

Its own module so that the services behind the gateway (query, retrieve, commitment) can take
one without importing the gateway."""

from __future__ import annotations

from dataclasses import dataclass

from portal.models import Facility


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of one association, once it was let in."""

    # Read once, at association: one query fewer per instance (a PACS sends hundreds, one
    # after the other, each waiting for its answer).
    facility: Facility
    calling_ae: str
    address: str
    tls: bool = False

    @property
    def source(self) -> str:
        return f"dicom{'s' if self.tls else ''}:{self.calling_ae}@{self.address}"
