"""What a code is: a stable name, its one-line meaning, the transforms that give it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, cast

__all__ = ["TRANSFORMS", "Code", "Transform", "code"]

Transform = Literal["fold", "capture", "merge", "drop_bias", "swap", "calibrate", "norm_affine"]
TRANSFORMS: tuple[Transform, ...] = ("fold", "capture", "merge", "drop_bias", "swap", "calibrate",
                                     "norm_affine")  # fmt: skip


@dataclass(frozen=True)
class Code:
    """One stable code: its name, its meaning (one line, README's wording) and the transforms
    that give it. ``meanings``: the wording of one transform's table where it differs."""

    name: str
    meaning: str
    transforms: tuple[Transform, ...]
    meanings: Mapping[Transform, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        unknown = [t for t in (*self.transforms, *self.meanings) if t not in TRANSFORMS]
        if unknown or not self.transforms:
            raise ValueError(f"code {self.name!r}: transforms {self.transforms} (known: {TRANSFORMS})")
        if set(self.meanings) - set(self.transforms):
            raise ValueError(f"code {self.name!r}: a meaning for a transform that does not give it")
        object.__setattr__(self, "meanings", MappingProxyType(dict(self.meanings)))

    def meaning_in(self, transform: Transform) -> str:
        """The meaning as ``transform``'s table words it."""
        return self.meanings.get(transform, self.meaning)


def code(name: str, meaning: str, transforms: Transform | tuple[Transform, ...], **meanings: str) -> Code:
    """A :class:`Code` given by one transform (a name) or several (a tuple)."""
    given: tuple[Transform, ...] = (transforms,) if isinstance(transforms, str) else transforms
    return Code(name, meaning, given, cast("dict[Transform, str]", meanings))
