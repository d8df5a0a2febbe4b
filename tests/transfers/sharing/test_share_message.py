"""The share message is e-mailed: share_message_check refuses one that identifies the patient."""

from __future__ import annotations

from datetime import date

import pytest

from transfers.models import Study
from transfers.sharing.message import share_message_check
from transfers.sharing.services import ShareError


def _study(name: str = "DOE^JANE^MARIE", patient_id: str = "MRN-00417", born: date | None = None):
    return Study(
        patient_name=name, patient_id=patient_id, patient_birth_date=born or date(1970, 3, 15)
    )


@pytest.mark.parametrize(
    "message",
    [
        "Please look at Mrs Doe's CT before the transfer.",
        "doe, jane: query PE",
        "Jane's scan",
        "The middle name is Marie.",
        "For the tumour board (DOE).",
    ],
)
def test_it_refuses_a_message_with_the_patients_name(message):
    with pytest.raises(ShareError, match="contains the patient's name") as refusal:
        share_message_check(message=message, studies=[_study()])
    assert "e-mailed and must not identify the patient" in str(refusal.value)
    assert "Refer to the study without them" in str(refusal.value)


def test_it_refuses_a_message_with_the_patients_id():
    with pytest.raises(ShareError, match="contains the patient's ID"):
        share_message_check(message="Chart mrn-00417, urgent", studies=[_study()])


@pytest.mark.parametrize(
    "written",
    [
        "1970-03-15",
        "1970/3/15",
        "03/15/1970",
        "3/15/70",
        "15.03.1970",
        "15/03/1970",
        "19700315",
        "March 15, 1970",
        "march 15 1970",
        "Mar. 15th, 1970",
        "15 Mar 1970",
        "15th of March 1970",
        "15-Mar-1970",
    ],
)
def test_it_refuses_a_message_with_the_birth_date_however_written(written):
    with pytest.raises(ShareError, match="contains the patient's birth date"):
        share_message_check(message=f"Born {written}, please compare.", studies=[_study()])


def test_it_names_everything_it_found():
    with pytest.raises(ShareError, match="the patient's name, ID and birth date"):
        share_message_check(message="Jane Doe MRN-00417 born 1970-03-15", studies=[_study()])


def test_it_checks_every_study_of_the_share():
    other = _study(name="ROE^RICHARD", patient_id="X-991", born=date(1981, 11, 2))
    with pytest.raises(ShareError, match="name"):
        share_message_check(message="Richard's follow-up", studies=[_study(), other])


@pytest.mark.parametrize(
    "message",
    [
        "",
        "Please review the CT of this morning before the transfer tomorrow.",
        # Longer words that contain a name, an ID inside a longer token, other dates.
        "Doerte will call; Janet too; Mariella knows.",
        "Ref XMRN-004170 and MRN-004171",
        "Seen on 1970-03-16 and 16 March 1970 and 19700316.",
        # The prefix and suffix of a DICOM name say nothing about the patient.
        "Dr Lee, please review; thanks, Jr team",
        # A one-letter initial and a very short ID are not matched.
        "J. is 2 series",
    ],
)
def test_it_accepts_a_message_that_does_not_identify_the_patient(message):
    share_message_check(
        message=message,
        studies=[_study(name="DOE^JANE^MARIE^Dr^Jr"), _study(name="KIM^J", patient_id="2")],
    )


def test_the_sending_facilitys_own_name_is_not_taken_for_the_patients(db: None) -> None:
    """A routing rule's message names its facility; a patient FALLS^GREAT at Great Falls Clinic
    must not stop it (the demo round trip did)."""
    from portal.models import Facility
    from transfers.models import Study

    gfc = Facility.objects.create(name="Great Falls Clinic", slug="gfc-msg")
    study = Study.objects.create(
        facility=gfc, study_instance_uid="1.2.3.99", patient_name="FALLS^GREAT", patient_id="GF-77"
    )
    share_message_check(
        message="Sent automatically by a routing rule of Great Falls Clinic.", studies=[study]
    )
    with pytest.raises(ShareError):
        share_message_check(message="Mr Falls, see Great Falls Clinic", studies=[study])
