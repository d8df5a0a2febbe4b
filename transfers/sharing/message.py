"""The share message is e-mailed to the recipient, and e-mail carries no patient information:
share_message_check refuses a message that holds the patient's name, ID or birth date.

Matching is deliberately simple and errs on the side of refusing: the sender can always say
"the CT of this morning" instead, while a name that slips through cannot be called back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date

from ..models import Study
from .errors import ShareError

# A patient ID this short ("1", "42") is also a count or a series number in ordinary prose;
# refusing every message that says "2 series" would teach senders to ignore the rule.
MIN_ID_LENGTH = 3
# Of a DICOM person name, the family, given and middle names; the prefix and suffix ("Dr",
# "Jr") say nothing about who the patient is and would refuse "Dr Lee, please review".
NAME_COMPONENTS = 3

MONTHS = (
    "january february march april may june july august september october november december"
).split()

EXPLANATION = (
    "The message is e-mailed and must not identify the patient: it contains the patient's "
    "{found}. Refer to the study without them (for example, 'the CT of this morning')."
)


def share_message_check(*, message: str, studies: Iterable[Study]) -> None:
    """Raise ShareError if the message names a study's patient, or gives their ID or birth
    date; matching ignores case."""
    if not message.strip():
        return
    studies = list(studies)
    # The sending facility's own name is not the patient's ("St. Mary's" for a patient Mary,
    # "Great Falls Clinic" for a patient Falls): it is taken out before looking.
    for name in {study.facility.name for study in studies if study.facility_id}:
        message = re.sub(re.escape(name), " ", message, flags=re.IGNORECASE)
    found: list[str] = []
    for study in studies:
        if "name" not in found and _has_name(message, study.patient_name):
            found.append("name")
        if "ID" not in found and _has_token(message, study.patient_id):
            found.append("ID")
        born = study.patient_birth_date
        if "birth date" not in found and born is not None and _has_date(message, born):
            found.append("birth date")
    if found:
        what = " and ".join([", ".join(found[:-1]), found[-1]] if len(found) > 1 else found)
        raise ShareError(EXPLANATION.format(found=what))


def _has_name(message: str, dicom_name: str) -> bool:
    """Any of the family, given or middle names (2 letters or more) as a whole word; a name
    of several words ("De La Cruz") as that phrase. Every '='-group of the name is looked at
    (alphabetic, ideographic, phonetic)."""
    for group in dicom_name.split("="):
        for component in group.split("^")[:NAME_COMPONENTS]:
            words = component.split()
            if sum(ch.isalpha() for ch in component) < 2:
                continue
            phrase = r"\s+".join(re.escape(word) for word in words)
            if re.search(rf"(?<!\w){phrase}(?!\w)", message, re.IGNORECASE):
                return True
    return False


def _has_token(message: str, patient_id: str) -> bool:
    """The patient ID as a whole token: not part of a longer run of letters and digits."""
    patient_id = patient_id.strip()
    if len(patient_id) < MIN_ID_LENGTH:
        return False
    pattern = rf"(?<![0-9A-Za-z]){re.escape(patient_id)}(?![0-9A-Za-z])"
    return re.search(pattern, message, re.IGNORECASE) is not None


def date_pattern(born: date) -> re.Pattern[str]:
    """The date in every written form people use, as one pattern (the share message check
    looks for it; de-identification takes it out of the descriptions it keeps)."""
    return re.compile(_date_regex(born), re.IGNORECASE)


def _has_date(message: str, born: date) -> bool:
    return date_pattern(born).search(message) is not None


def _date_regex(born: date) -> str:
    """The birth date as people write it: 1970-03-15, 1970/3/15, 03/15/1970, 15.03.1970,
    15/03/70, 19700315, March 15, 1970, 15 Mar 1970, 15th of March 1970, Mar. 15th 1970."""
    day = rf"0?{born.day}"
    month = rf"0?{born.month}"
    year = rf"(?:{born:%Y}|{born:%y})"
    sep = r"\s*[-/.]\s*"
    name = MONTHS[born.month - 1]
    short = "sept?" if born.month == 9 else name[:3]
    month_name = rf"(?:{name}|{short}\.?)"
    ordinal = r"(?:st|nd|rd|th)?"
    forms = [
        rf"{born:%Y}{sep}{month}{sep}{day}",  # ISO, and 1970/3/15
        rf"{month}{sep}{day}{sep}{year}",  # US
        rf"{day}{sep}{month}{sep}{year}",  # European
        rf"{born:%Y%m%d}",  # DICOM
        rf"{month_name}\s*{day}{ordinal},?\s*{year}",  # March 15, 1970
        rf"{day}{ordinal}(?:\s+of)?[\s-]*{month_name}[\s,-]*{year}",  # 15 Mar 1970
    ]
    pattern = r"(?<![0-9A-Za-z])(?:" + "|".join(forms) + r")(?![0-9A-Za-z])"
    return pattern
