"""What to try next after a run: one line, from the scorecard, naming the flag to change, its direction and a value.

Settings tuned on one model rarely transfer (the demo's GradDiff lr forgets nothing on a model trained longer, whose
weights sit deeper in their minima).  Rather than guess a scale from the weights, `run` reads its own result and,
when the result misses, says which knob of the method to turn.  The rule, checked in this order (the first that
applies gives the line; none applies: no advice):

1. too weak: the forgetting property fails (the forget metric dropped less than `forget_margin` of base - chance)
   -> the method's first strengthening knob (STRONGER) up, or more --steps;
2. retain damaged: forgetting passes, retain preservation fails -> the same knob down, or fewer --steps;
3. back under NF4: forgetting and retain pass, the PTQ-gap property fails -> MANSU's floor: a larger --kappa for the
   MANSU family; --method mansu for the others (their sub-bin updates round back to the base's codes).

A base that does not know the forget set ("nothing to forget") gets no advice: no setting can help there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# (UnlearnConfig field, factor): the knob that makes each method forget more, the first one a method reads wins;
# factor < 1 means smaller is stronger.  steps (every method's) is always offered after it.
STRONGER: tuple[tuple[str, float], ...] = (
    ("update_fraction", 4.0),  # MANSU: more candidate weights per step (each moves a whole bin)
    ("lr", 3.0),               # gradient baselines: the step size
    ("sure_lr", 3.0),          # SURE's large learning rate
    ("rmu_steering", 2.0),     # RMU: how far forget activations are pushed
    ("ssd_alpha", 0.5),        # SSD: a lower selection threshold dampens more weights
)
KNOB_OF = {"mansu_no_floor": "lr"}  # its dense updates move every weight: the step size, not the candidate count
STEPS_FACTOR = 2.0
KAPPA_FACTOR = 2.0


@dataclass(frozen=True)
class Advice:
    kind: str               # "too weak", "retain damaged" or "back under NF4"
    line: str               # what `run` prints and the app shows
    flags: dict[str, Any]   # the suggested settings, by UnlearnConfig field


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _tested(prop: dict[str, Any]) -> float:
    """The number the scorecard held against the threshold (the CI end for the PTQ gap; older cards: the value)."""
    value = prop.get("tested", prop.get("value"))
    return float(value) if value is not None else 0.0


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _knob(method: str) -> str | None:
    from mansu.unlearn.methods import METHODS

    if method in KNOB_OF:
        return KNOB_OF[method]
    reads = set(METHODS[method].fields)
    return next((name for name, _ in STRONGER if name in reads), None)


def _moves(unlearn: dict[str, Any], *, stronger: bool) -> dict[str, Any]:
    """The method's knob and --steps moved towards more (stronger) or less forgetting."""
    out: dict[str, Any] = {}
    knob = _knob(unlearn["method"])
    if knob is not None:
        factor = dict(STRONGER)[knob]
        out[knob] = float(_fmt(unlearn[knob] * (factor if stronger else 1 / factor)))
    steps = unlearn["steps"] * STEPS_FACTOR if stronger else unlearn["steps"] / STEPS_FACTOR
    if max(1, round(steps)) != unlearn["steps"]:
        out["steps"] = max(1, round(steps))
    return out


def _try(moves: dict[str, Any], unlearn: dict[str, Any]) -> str:
    options = [f"{flag(k)} {_fmt(v) if isinstance(v, float) else v} (now {_fmt(unlearn[k])})"
               for k, v in moves.items()]
    return "try " + " or ".join(options) if options else "try another --method"


def advise(card: dict[str, Any], unlearn: dict[str, Any]) -> Advice | None:
    """The advice for a finished run from its scorecard and its unlearning settings (UnlearnConfig.to_dict())."""
    if card.get("nothing_to_forget"):
        return None
    props = card.get("properties") or {}
    forgetting, retain, gap = (props.get(k) or {} for k in ("forgetting", "retain", "ptq_gap"))
    metric = forgetting.get("metric", "forget metric")
    if forgetting.get("status") == "fail":
        moves = _moves(unlearn, stronger=True)
        line = (f"{unlearn['method']} did not forget meaningfully on this model: the forget {metric} dropped "
                f"{_tested(forgetting):.2f} of its way to chance (needs {forgetting['threshold']:.2f}); "
                f"{_try(moves, unlearn)}")
        return Advice("too weak", line, moves)
    if forgetting.get("status") == "pass" and retain.get("status") == "fail":
        moves = _moves(unlearn, stronger=False)
        line = (f"{unlearn['method']} forgot, but damaged the retain set (retain {retain.get('metric', metric)} lost "
                f"{_tested(retain):.2f}, allowed {retain['threshold']:.2f}); {_try(moves, unlearn)}")
        return Advice("retain damaged", line, moves)
    if forgetting.get("status") == "pass" and gap.get("status") == "fail":
        return _undone_by_nf4(unlearn, gap)
    return None


def _undone_by_nf4(unlearn: dict[str, Any], gap: dict[str, Any]) -> Advice:
    method = unlearn["method"]
    if _knob(method) == "update_fraction":  # the floored MANSU family
        moves = {"kappa": float(_fmt(unlearn["kappa"] * KAPPA_FACTOR))}
        tail = _try(moves, unlearn) + " (each move crosses more NF4 bins)"
    else:
        moves = {"method": "mansu"}
        tail = "try --method mansu (its floor moves each weight a whole NF4 bin, so rounding cannot undo it)"
    line = (f"NF4 may bring {method}'s forgetting back (PTQ gap's 95% CI high end {_tested(gap):+.2f} of base - "
            f"chance, allowed {gap['threshold']:+.2f}); {tail}")
    return Advice("back under NF4", line, moves)


def advice_entry(card: dict[str, Any], unlearn: dict[str, Any]) -> dict[str, Any]:
    """metrics.json "advice": the Advice as a dict, or {"kind": "none"} when the run needs none."""
    advice = advise(card, unlearn)
    return asdict(advice) if advice is not None else {"kind": "none", "line": "", "flags": {}}
