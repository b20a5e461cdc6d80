"""The four-property scorecard of a run (SPEC.md, "The four properties"), each pass/fail with its margin.

With accuracies on the forget (f) and retain (r) MCQ splits, "fp" the unlearned model in full precision,
"nf4" its NF4 twin, "base" the model before unlearning (full precision):

    1. meaningful forgetting   drop   = acc_f(base) - acc_f(fp)          pass iff drop >= forget_margin
    2. retain preservation     loss   = acc_r(base) - acc_r(fp)          pass iff loss <= retain_margin
    3. non-positive PTQ gap    gap    = acc_f(nf4) - acc_f(fp)           pass iff gap  <= max_ptq_gap
                                (paired bootstrap 95% CI reported; `recovery_significant` when its low end > 0)
    4. structural erasure      CAD(before, after NF4) over the original circuit   pass iff CAD >= cad_threshold
                                (NF4: the erasure must hold in the model that is deployed)

`margin` is how far inside (+) or outside (-) the threshold the value lies.  A property whose inputs are
missing (e.g. attribution not available) is reported as status "not available", never as a pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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
        return {"status": "not available", "pass": False, "value": None, "threshold": threshold, "margin": None, **extra}
    margin = value - threshold if higher_is_better else threshold - value
    return {"status": "pass" if margin >= 0 else "fail", "pass": margin >= 0, "value": value,
            "threshold": threshold, "margin": margin, **extra}


def _acc(metrics: dict, key: str, split: str) -> float | None:
    try:
        return float(metrics[key][split]["accuracy"])
    except (KeyError, TypeError):
        return None


def build_scorecard(metrics: dict[str, Any], cad: dict[str, Any] | None, config: ScorecardConfig = ScorecardConfig()) -> dict:
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
                                    rule="CAD(before, after NF4) >= threshold"),
    }
    return {"properties": props, "all_pass": all(p["pass"] for p in props.values()),
            "n_pass": sum(p["pass"] for p in props.values()), "config": asdict(config)}


def format_scorecard(card: dict) -> str:
    """One line per property: name, PASS/FAIL/n.a., value vs threshold, margin."""
    lines = []
    for name, p in card["properties"].items():
        if p["value"] is None:
            lines.append(f"{name:<19} n/a   ({p['status']})")
        else:
            lines.append(f"{name:<19} {'PASS' if p['pass'] else 'FAIL'}  value {p['value']:+.3f}  "
                         f"threshold {p['threshold']:.3f}  margin {p['margin']:+.3f}")
    return "\n".join(lines)
