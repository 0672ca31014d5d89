"""Built-in method recipes: every module in this package is imported, registering its methods."""

from __future__ import annotations

import importlib
import pkgutil

# Listing order of `testtime methods` and `--method all`; methods not named here follow alphabetically.
CANONICAL_ORDER = (
    "source", "bn", "tent", "eta", "eata", "sar", "deyo", "cotta", "rmt", "petal", "rotta", "roid",
    "lame", "unmix_tns", "alpha_bn", "adanpc", "t3a", "cafa", "crowd_filter",
    "memo", "shot",
)  # fmt: skip

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
