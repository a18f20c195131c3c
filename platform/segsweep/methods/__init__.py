"""Methods: an explicit name -> class table. Each method is one file (see ``base.py``).

``METHODS`` is the one place a method is registered: the run config takes each entry's
``Knobs`` as the section of its name and accepts exactly these names for ``method``
(``config.run_config_model``); ``segsweep methods``, sweep specs and the contract tests read
it too. Adding a method: its file, one entry here.
"""

from __future__ import annotations

from segsweep.errors import ConfigError
from segsweep.methods.base import Batch, Knobs, Method, Stage
from segsweep.methods.fixmatch import FixMatch
from segsweep.methods.guidedmix import GuidedMix
from segsweep.methods.hfpl import HFPL
from segsweep.methods.mixandmatch import MixAndMatch
from segsweep.methods.s4mim import S4MIM
from segsweep.methods.supervised import Supervised

METHODS: dict[str, type[Method]] = {
    "supervised": Supervised,
    "fixmatch": FixMatch,
    "guidedmix": GuidedMix,
    "s4mim": S4MIM,
    "hfpl": HFPL,
    "mixandmatch": MixAndMatch,
}


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method: unknown method '{name}'; valid methods: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Batch", "Knobs", "Method", "Stage", "get_method"]
