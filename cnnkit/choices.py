"""Fixed-choice options as string enums, so `--help` lists their values and the library checks them once."""

from __future__ import annotations

from enum import Enum

from cnnkit.errors import CnnkitError


class Choice(str, Enum):
    """A string enum whose members print as their value (``--head logreg``, not ``Head.logreg``)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value, flag: str):
        """``value`` as a member, or a CnnkitError naming ``flag`` and the allowed values."""
        try:
            return cls(value.value if isinstance(value, Enum) else value)
        except ValueError:
            raise CnnkitError(f"{flag} {value!r}: choose from {', '.join(m.value for m in cls)}") from None
