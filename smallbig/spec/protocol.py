"""The test protocol: CLIPS x CROPS views of a video (the paper's "10 x 3"). One parser, one crop
size rule, used by the data layer, the model info, the plan, the engine and the report."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from smallbig.errors import InputError

if TYPE_CHECKING:
    from smallbig.spec.params import TestSpec

_PATTERN = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


class ProtocolError(InputError):
    """Not a CLIPSxCROPS protocol; the message says what was given and what is expected."""


@dataclass(frozen=True, order=True)
class Protocol:
    """`clips` temporal clips × `crops` spatial crops (1 = centre crop, 3 = both ends and centre
    of the long side)."""

    clips: int
    crops: int

    def __post_init__(self) -> None:
        if self.clips < 1 or self.crops not in (1, 3):
            raise ProtocolError(
                f"protocol {self.clips}x{self.crops}: clips must be >= 1 and crops 1 or 3 (e.g. 10x3)"
            )

    @classmethod
    def parse(cls, text: str | Protocol) -> Protocol:
        """'10x3' (also '10X3', '10×3', spaces around) -> Protocol(10, 3)."""
        if isinstance(text, Protocol):
            return text
        m = _PATTERN.match(str(text))
        if not m:
            raise ProtocolError(f"protocol {text!r}: expected CLIPSxCROPS with crops 1 or 3, e.g. 10x3")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def name(self) -> str:
        return f"{self.clips}x{self.crops}"

    @property
    def views(self) -> int:
        return self.clips * self.crops

    def crop_size(self, test: TestSpec) -> int:
        """The test crop: 3-crop protocols use `test.multi_crop_size` (256), 1-crop protocols a
        centre crop of `test.single_crop_size` (224)."""
        return test.multi_crop_size if self.crops == 3 else test.single_crop_size

    def __str__(self) -> str:
        return self.name
