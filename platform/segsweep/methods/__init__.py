"""Methods: an explicit name -> class table. Each method is one file (see ``base.py``)."""

from __future__ import annotations

from segsweep.errors import ConfigError
from segsweep.methods.base import Batch, Knobs, Method, Stage
from segsweep.methods.fixmatch import FixMatch
from segsweep.methods.supervised import Supervised

METHODS: dict[str, type[Method]] = {
    "supervised": Supervised,
    "fixmatch": FixMatch,
}

#: Each method's knobs model, the type of its section in the run config.
KNOBS: dict[str, type[Knobs]] = {name: cls.Knobs for name, cls in METHODS.items()}


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method: unknown method '{name}'; valid methods: {', '.join(METHODS)}") from None


__all__ = ["KNOBS", "METHODS", "Batch", "Knobs", "Method", "Stage", "get_method"]
