"""The method registry: every list of unlearning methods in mansu (config check, CLI choices and help, the app's
picker, the demo settings, the pipeline's circuit restriction) derives from `METHODS`.

Adding a method is one module in this package (a `Method` subclass with a `name`) plus its module's line in
`METHOD_MODULES`; the order here is the order of every picker.
"""

from __future__ import annotations

import importlib

from mansu.unlearn.methods.base import Method

METHOD_MODULES = (
    "mansu",      # MANSU and its ablations
    "ga",
    "graddiff",
    "npo",
    "simnpo",
    "rmu",
    "sure",
    "gu",
    "ssd",
)


def _methods_of(module_name: str) -> list[type[Method]]:
    """The named Method classes a module defines, in definition order."""
    module = importlib.import_module(f"{__name__}.{module_name}")
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Method) and obj.__module__ == module.__name__
            and "name" in vars(obj)]


METHODS: dict[str, type[Method]] = {cls.name: cls for name in METHOD_MODULES for cls in _methods_of(name)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; accepted are {', '.join(METHODS)}")
    return METHODS[name]
