"""Typed option fields: a dataclass field with its help text and its accepted range in the field's metadata, the
generic validation that reads them, and the argparse flags generated from them.

    steps: int = opt(8, "optimisation steps", lo=1, hi=100_000)
    optimizer: Optimizer = opt("adam", "baselines' optimizer")        # a Literal: its values are the choices

`validate(obj)` checks every field of a dataclass instance against its annotation (Literal choices, int, float,
bool, str, optional None) and range; `add_flags(parser, cls)` adds one `--field-name` flag per field, so adding a
run option is one typed field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


def opt(default: Any, help: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
        hi_open: bool = False, flag: bool = True, **kwargs: Any) -> Any:
    """A dataclass field carrying its help text and range (`flag=False`: no CLI flag is generated)."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "flag": flag}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in get_args(tp)
    return tp, False


def field_types(cls: type) -> dict[str, tuple[Any, bool]]:
    """{field name: (type without Optional, optional?)} with string annotations resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: _split_optional(hints[f.name]) for f in dataclasses.fields(cls)}


def choices(tp: Any) -> tuple | None:
    return get_args(tp) if get_origin(tp) is Literal else None


def _check_value(prefix: str, name: str, value: Any, tp: Any, meta: dict) -> None:
    label = f"{prefix}{name}"
    accepted = choices(tp)
    if accepted is not None:
        if value not in accepted:
            raise ValueError(f"{label} {value!r} is not supported; accepted are {', '.join(map(str, accepted))}")
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{label} must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label} must be an integer{_range_text(meta)}, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{label} must be a number{_range_text(meta)}, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{label} must be a string, got {value!r}")
    if tp in (int, float) and not _in_range(value, meta):
        kind = "an integer" if tp is int else "a number"
        raise ValueError(f"{label} must be {kind}{_range_text(meta)}, got {value!r}")


def _in_range(value: float, meta: dict) -> bool:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        return False
    return not (hi is not None and (value >= hi if meta.get("hi_open") else value > hi))


def _range_text(meta: dict) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return ""
    left = "(" if meta.get("lo_open") else "["
    right = ")" if meta.get("hi_open") else "]"
    return f" in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def validate(obj: Any, prefix: str = "") -> None:
    """Check every field of the dataclass instance `obj` against its type and range (ValueError, one line)."""
    types_ = field_types(type(obj))
    for f in dataclasses.fields(obj):
        tp, optional = types_[f.name]
        value = getattr(obj, f.name)
        if value is None and optional:
            continue
        if dataclasses.is_dataclass(tp) or tp in (dict, list) or get_origin(tp) in (dict, list):
            continue
        _check_value(prefix, f.name, value, tp, dict(f.metadata))


def from_dict(cls: type, data: Any, what: str) -> Any:
    """cls(**data) after checking that `data` is an object with known keys only."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; accepted are {sorted(names)}")
    return cls(**data)


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, *, skip: tuple[str, ...] = (),
              extra_help: dict[str, str] | None = None) -> list[str]:
    """One `--field-name` flag per field of `cls` (default None: "not given"); returns the field names."""
    added = []
    for f in dataclasses.fields(cls):
        tp, _ = field_types(cls)[f.name]
        if f.name in skip or not f.metadata.get("flag", True) or dataclasses.is_dataclass(tp) or tp in (dict, list):
            continue
        help_text = f.metadata.get("help", f.name) + (extra_help or {}).get(f.name, "")
        shown = f.default not in (dataclasses.MISSING, None, "") and "default" not in help_text
        default_text = f" (default {f.default})" if shown else ""
        flag = "--" + f.name.replace("_", "-")
        help_text = (help_text + default_text).replace("%", "%%")  # argparse %-formats help ("95% CI")
        kwargs: dict[str, Any] = {"default": None, "dest": f.name, "help": help_text}
        if choices(tp) is not None:
            kwargs["choices"] = list(choices(tp))
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {int: _parse_int, float: _parse_float}.get(tp, str)
        parser.add_argument(flag, **kwargs)
        added.append(f.name)
    return added


def given(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The flags among `names` that were given on the command line."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
