"""The Accept header of a DICOMweb request as ranked media ranges (PS3.18 §8.7.3, RFC 9110 §12.5.1).

Peers differ in how they write it: dicomweb-client and Orthanc quote the `type` parameter
(`multipart/related; type="application/dicom"; transfer-syntax=*`), OHIF does not
(`multipart/related; type=application/octet-stream; transfer-syntax=*`). Unquoted, the
transfer-syntax is a parameter of the multipart range itself; quoted, it may also sit inside
the quotes. Both read the same here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A media range: type/subtype then parameters; a quoted value may hold ';' and ','.
_PARAM = re.compile(r'\s*;\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,]*)')
_RANGE = re.compile(r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)/([!#$%&'*+.^_`|~0-9A-Za-z-]+)")
MAX_RANGES = 32


class AcceptError(ValueError):
    """The header cannot be read."""


@dataclass(frozen=True)
class MediaRange:
    type: str  # "multipart/related", "application/dicom", "*/*" ...
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def inner_type(self) -> str:
        """For multipart/related, the type of its parts (lower case, without parameters)."""
        return self.params.get("type", "").split(";")[0].strip().lower()

    @property
    def transfer_syntax(self) -> str | None:
        """The transfer-syntax asked for: a UID, "*", or None when not said (the default)."""
        if "transfer-syntax" in self.params:
            return self.params["transfer-syntax"]
        # Quoted: type="application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
        for part in self.params.get("type", "").split(";")[1:]:
            name, _, value = part.partition("=")
            if name.strip().lower() == "transfer-syntax":
                return value.strip().strip('"')
        return None

    def matches(self, media_type: str) -> bool:
        main, _, sub = media_type.partition("/")
        mine_main, _, mine_sub = self.type.partition("/")
        return mine_main in ("*", main) and mine_sub in ("*", sub)


def accept_parse(header: str | None) -> list[MediaRange]:
    """The ranges of an Accept header, best first (by q, then as written); q=0 ranges dropped.

    No header (or an empty one) is `*/*`."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[tuple[float, int, MediaRange]] = []
    pos = 0
    text = header
    while pos < len(text):
        match = _RANGE.match(text, pos)
        if match is None:
            raise AcceptError(f"cannot read the Accept header at character {pos + 1}")
        pos = match.end()
        params: dict[str, str] = {}
        while (param := _PARAM.match(text, pos)) is not None:
            value = param.group(2).strip()
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[param.group(1).lower()] = value
            pos = param.end()
        rest = text[pos:].lstrip()
        if rest and not rest.startswith(","):
            raise AcceptError(
                f"cannot read the Accept header at character {len(text) - len(rest) + 1}"
            )
        pos = len(text) - len(rest) + 1 if rest else len(text)
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            raise AcceptError("a q value of the Accept header is not a number") from None
        if not 0 <= q <= 1:
            raise AcceptError("a q value of the Accept header is not between 0 and 1")
        media = f"{match.group(1)}/{match.group(2)}".lower()
        if q > 0:
            ranges.append((q, len(ranges), MediaRange(media, params, q)))
        if len(ranges) > MAX_RANGES:
            raise AcceptError(f"the Accept header lists more than {MAX_RANGES} media ranges")
    ranges.sort(key=lambda item: (-item[0], item[1]))
    return [item[2] for item in ranges]
