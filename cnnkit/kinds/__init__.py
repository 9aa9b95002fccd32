"""The kinds of model a run holds -- feature head, network, ensemble -- one module each (see ``registry``)."""

from cnnkit.kinds.registry import (Forward, Kind, ModelDescription, Section, TriedRow, get_kind, register_kind,
                                   registered_kinds)

# Importing the kinds registers them (each decorates its class with ``register_kind``).
from cnnkit.kinds import feature_head, network, ensemble  # noqa: E402,F401

__all__ = ["Forward", "Kind", "ModelDescription", "Section", "TriedRow", "get_kind", "register_kind",
           "registered_kinds"]
