"""The four-property scorecard of a run (SPEC.md, "The four properties"), each pass/fail with its margin.

With accuracies on the forget (f) and retain (r) MCQ splits, "fp" the unlearned model in full precision,
"nf4" its NF4 twin, "base" the model before unlearning (full precision):

    1. meaningful forgetting   drop   = acc_f(base) - acc_f(fp)          pass iff drop >= forget_margin
    2. retain preservation     loss   = acc_r(base) - acc_r(fp)          pass iff loss <= retain_margin
    3. non-positive PTQ gap    gap    = acc_f(nf4) - acc_f(fp)           pass iff gap  <= max_ptq_gap
                                (paired bootstrap 95% CI reported; `recovery_significant` when its low end > 0)
    4. structural erasure      CAD(before, after NF4) over the original circuit   pass iff CAD >= cad_threshold
                                (NF4: the erasure must hold in the model that is deployed)

NF4 is the headline (the paper's).  `survives` applies property 3 to every quantizer the run scored (nf4, fp4,
int8, int4-g128 by default): survives iff acc_f(q) - acc_f(fp) <= max_ptq_gap, with the gap's paired CI.

The accuracies are each split's "accuracy" (mansu.metrics.scoring): MCQ accuracy under the run's template; for QA
and text records, where no choice accuracy exists, token accuracy (the fraction of answer / text tokens that are the
model's top-1 next token, the per-token form of the loss), so the same margins read in the same [0, 1] units.

`margin` is how far inside (+) or outside (-) the threshold the value lies.  A property whose inputs are
missing (e.g. attribution not available) is reported as status "not available", never as a pass, with the
`reason` cad.json gives (e.g. why no circuit was found).

Ties pass: accuracies are ratios of counts, so 1.0 - 0.95 is 0.050000000000000044 in floating point and
1.0 - 0.8 is 0.19999999999999996.  Values and margins are therefore rounded to DECIMALS places before they are
stored, and a property passes when its margin >= -TOLERANCE (1e-9, far below one example in a billion-example
split, far above float64 rounding of differences of numbers in [0, 1]).

scorecard.json has one writer (`write_scorecard`) and one typed reader (`read_scorecard`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

from mansu.io import read_checked, write_checked
from mansu.runs import layout

PropertyName = Literal["forgetting", "retain", "ptq_gap", "structural_erasure"]
PROPERTIES: tuple[PropertyName, ...] = ("forgetting", "retain", "ptq_gap", "structural_erasure")
STATUSES = ("pass", "fail", "not available")
TOLERANCE = 1e-9   # a margin this far below zero is a tie, and ties pass
DECIMALS = 12      # stored values and margins: float noise of differences of ratios rounded away

# One property's entry; "pass" is a Python keyword, hence the functional form.
Property = TypedDict("Property", {"status": str, "pass": bool, "value": "float | None", "threshold": float,
                                  "margin": "float | None", "rule": str}, total=False)


class Scorecard(TypedDict):
    """scorecard.json (without its provenance stamp)."""
    properties: dict[str, Property]
    all_pass: bool
    n_pass: int
    config: dict[str, float]


@dataclass(frozen=True)
class ScorecardConfig:
    forget_margin: float = 0.20   # forget accuracy must fall by >= 20 points (4-way MCQ: noise is ~ +-8 at n=120)
    retain_margin: float = 0.05   # retain accuracy may fall by <= 5 points
    max_ptq_gap: float = 0.0      # NF4 may not bring any forgotten answer back on average
    cad_threshold: float = 0.30   # CAD in [0, 1]; 0.3 ~ edges moved by a third of their combined attribution

    def __post_init__(self) -> None:
        for name in ("forget_margin", "retain_margin", "cad_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"scorecard {name} must be a number in [0, 1], got {v!r}")
        if not isinstance(self.max_ptq_gap, (int, float)) or not -1 <= self.max_ptq_gap <= 1:
            raise ValueError(f"scorecard max_ptq_gap must be a number in [-1, 1], got {self.max_ptq_gap!r}")


def _prop(value: float | None, threshold: float, higher_is_better: bool, **extra: Any) -> dict[str, Any]:
    if value is None:
        return {"status": "not available", "pass": False, "value": None, "threshold": threshold, "margin": None,
                **extra}
    value = round(value, DECIMALS)
    margin = round(value - threshold if higher_is_better else threshold - value, DECIMALS)
    passed = margin >= -TOLERANCE
    return {"status": "pass" if passed else "fail", "pass": passed, "value": value,
            "threshold": threshold, "margin": margin, **extra}


def _acc(metrics: dict, key: str, split: str) -> float | None:
    try:
        return float(metrics[key][split]["accuracy"])
    except (KeyError, TypeError):
        return None


def build_scorecard(metrics: dict[str, Any], cad: dict[str, Any] | None,
                    config: ScorecardConfig = ScorecardConfig()) -> dict:
    """Scorecard dict from metrics.json (keys base_fp, unlearned_fp, unlearned_nf4, ptq_gap) and cad.json."""
    bf, uf = _acc(metrics, "base_fp", "forget"), _acc(metrics, "unlearned_fp", "forget")
    br, ur = _acc(metrics, "base_fp", "retain"), _acc(metrics, "unlearned_fp", "retain")
    gap = (metrics.get("ptq_gap") or {}).get("forget") or {}
    cad_nf4 = ((cad or {}).get("after_nf4") or {}).get("value")
    props = {
        "forgetting": _prop(None if bf is None or uf is None else bf - uf, config.forget_margin, True,
                            base=bf, unlearned=uf, rule="acc_forget(base) - acc_forget(unlearned) >= threshold"),
        "retain": _prop(None if br is None or ur is None else br - ur, config.retain_margin, False,
                        base=br, unlearned=ur, rule="acc_retain(base) - acc_retain(unlearned) <= threshold"),
        "ptq_gap": _prop(gap.get("gap"), config.max_ptq_gap, False, ci_low=gap.get("ci_low"),
                         ci_high=gap.get("ci_high"), recovery_significant=(gap.get("ci_low") or 0) > 0,
                         rule="acc_forget(NF4) - acc_forget(fp) <= threshold"),
        "structural_erasure": _prop(cad_nf4, config.cad_threshold, True,
                                    ci_low=((cad or {}).get("after_nf4") or {}).get("ci_low"),
                                    ci_high=((cad or {}).get("after_nf4") or {}).get("ci_high"),
                                    cad_fp=((cad or {}).get("after_fp") or {}).get("value"),
                                    rule="CAD(before, after NF4) >= threshold",
                                    **({"reason": cad["reason"]} if cad_nf4 is None and (cad or {}).get("reason")
                                       else {})),
    }
    return {"properties": props, "all_pass": all(p["pass"] for p in props.values()),
            "n_pass": sum(p["pass"] for p in props.values()), "config": asdict(config),
            "survives": survives(metrics, config)}


def survives(metrics: dict[str, Any], config: ScorecardConfig = ScorecardConfig()) -> dict[str, dict[str, Any]]:
    """Property 3 per quantizer (metrics.json ptq_gap_by_quantizer): {quantizer: {survives, gap, ci_low, ci_high,
    margin, recovery_significant}}, survives iff gap <= max_ptq_gap (ties pass, as above).  NF4 stays the
    headline property; this says which other deployed formats the forgetting survives."""
    out = {}
    for q, entry in (metrics.get("ptq_gap_by_quantizer") or {}).items():
        gap = (entry or {}).get("forget") or {}
        p = _prop(gap.get("gap"), config.max_ptq_gap, False)
        out[q] = {"survives": p["pass"], "status": p["status"], "gap": p["value"], "margin": p["margin"],
                  "ci_low": gap.get("ci_low"), "ci_high": gap.get("ci_high"),
                  "recovery_significant": (gap.get("ci_low") or 0) > 0}
    return out


def _bad(where: str, what: str, value: Any) -> ValueError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return ValueError(f"{where} must be {what}, got {shown}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_property(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise _bad(where, "a JSON object", entry)
    if entry.get("status") not in STATUSES:
        raise _bad(f"{where}.status", f"one of {', '.join(STATUSES)}", entry.get("status"))
    if not isinstance(entry.get("pass"), bool):
        raise _bad(f"{where}.pass", "true or false", entry.get("pass"))
    for name in ("value", "margin"):
        if entry.get(name) is not None and not _is_number(entry[name]):
            raise _bad(f"{where}.{name}", "a number or null", entry[name])
    if not _is_number(entry.get("threshold")):
        raise _bad(f"{where}.threshold", "a number", entry.get("threshold"))


def check_scorecard(data: Any, where: str = layout.SCORECARD) -> Scorecard:
    """`data` as a Scorecard, or a ValueError naming the first field of the wrong shape."""
    if not isinstance(data, dict):
        raise _bad(where, "a JSON object", data)
    props = data.get("properties")
    if not isinstance(props, dict):
        raise _bad(f"{where}: properties", f"an object keyed by {', '.join(PROPERTIES)}", props)
    for name, entry in props.items():
        if name not in PROPERTIES:
            raise ValueError(f"{where}: unknown property {name!r}; accepted are {', '.join(PROPERTIES)}")
        _check_property(entry, f"{where}: properties.{name}")
    if not isinstance(data.get("all_pass"), bool):
        raise _bad(f"{where}: all_pass", "true or false", data.get("all_pass"))
    return data  # type: ignore[return-value]


def write_scorecard(run: Path, card: dict[str, Any]) -> Path:
    """Write scorecard.json (stamped) after checking its shape; returns the path."""
    return write_checked(Path(run) / layout.SCORECARD, card, check_scorecard)


def read_scorecard(run: Path) -> Scorecard | None:
    """scorecard.json of a run (None when not written yet); a wrong shape raises ValueError naming the field."""
    return read_checked(Path(run) / layout.SCORECARD, check_scorecard)


def format_scorecard(card: dict) -> str:
    """One line per property: name, PASS/FAIL/n.a., value vs threshold, margin."""
    lines = []
    for name, p in card["properties"].items():
        if p["value"] is None:
            why = f": {p['reason']}" if p.get("reason") else ""
            lines.append(f"{name:<19} n/a   ({p['status']}{why})")
        else:
            lines.append(f"{name:<19} {'PASS' if p['pass'] else 'FAIL'}  value {p['value']:+.3f}  "
                         f"threshold {p['threshold']:.3f}  margin {p['margin']:+.3f}")
    survived = card.get("survives") or {}
    if survived:
        lines.append("PTQ gap per quantizer: " + ", ".join(
            f"{q} {'survives' if e['survives'] else 'NOT'} ({e['gap']:+.3f})" if e.get("gap") is not None
            else f"{q} n/a" for q, e in survived.items()))
    return "\n".join(lines)
