"""The method registry: every list of unlearning methods in mansu (config check, CLI choices and help, the app's
picker, the demo settings, the pipeline's circuit restriction) derives from `METHODS`.

Adding a method is one module in this package plus one line in the tuple below.
"""

from __future__ import annotations

from mansu.unlearn.methods.base import Method
from mansu.unlearn.methods.ga import GA
from mansu.unlearn.methods.graddiff import GradDiff
from mansu.unlearn.methods.gu import GU
from mansu.unlearn.methods.mansu import Mansu, MansuNoCircuit, MansuNoFisher, MansuNoFloor
from mansu.unlearn.methods.npo import NPO
from mansu.unlearn.methods.rmu import RMU
from mansu.unlearn.methods.simnpo import SimNPO
from mansu.unlearn.methods.ssd import SSD
from mansu.unlearn.methods.sure import SURE

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    Mansu, MansuNoFloor, MansuNoCircuit, MansuNoFisher,
    GA, GradDiff, NPO, SimNPO, RMU, SURE, GU, SSD,
)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; accepted are {', '.join(METHODS)}")
    return METHODS[name]
