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

The metric matches the split's data shape (its "shape" in metrics.json), always in [0, 1], higher = knows more:

    mcq   "accuracy": MCQ accuracy under the run's template (mansu.metrics.scoring)
    text  verbatim memorisation: mean ROUGE-L recall of the greedy continuation of each text's prefix against the
          true continuation (MUSE's VerbMem; mansu.metrics.text)
    qa    knowledge memorisation: mean ROUGE-L recall of the greedy answer against the true answer (TOFU, KnowMem)

so forgetting on text is the drop of verbatim recall, and the PTQ gap of a text or QA forget set is the paired gap of
that recall (ptq_gap.forget.rouge_l).  Retain preservation on a QA/text retain set also fails when the retain loss
(mean NLL per token) rises by more than retain_loss_margin nats: recall can hold while the model's fit to the text
degrades (GradDiff's typical damage).  Runs scored before these metrics existed fall back to token accuracy.

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
from mansu.options import opt
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
    retain_loss_margin: float = opt(0.20, "QA/text retain sets: the retain loss (mean NLL per token) may rise by at "
                                          "most this many nats (0.2 nats: perplexity x1.22)", lo=0.0)

    def __post_init__(self) -> None:
        for name in ("forget_margin", "retain_margin", "cad_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"scorecard {name} must be a number in [0, 1], got {v!r}")
        if not isinstance(self.max_ptq_gap, (int, float)) or not -1 <= self.max_ptq_gap <= 1:
            raise ValueError(f"scorecard max_ptq_gap must be a number in [-1, 1], got {self.max_ptq_gap!r}")
        v = self.retain_loss_margin
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ValueError(f"scorecard retain_loss_margin must be a number of nats >= 0, got {v!r}")


def _prop(value: float | None, threshold: float, higher_is_better: bool, **extra: Any) -> dict[str, Any]:
    if value is None:
        return {"status": "not available", "pass": False, "value": None, "threshold": threshold, "margin": None,
                **extra}
    value = round(value, DECIMALS)
    margin = round(value - threshold if higher_is_better else threshold - value, DECIMALS)
    passed = margin >= -TOLERANCE
    return {"status": "pass" if passed else "fail", "pass": passed, "value": value,
            "threshold": threshold, "margin": margin, **extra}


METRIC_LABELS = {"mcq": "accuracy", "text": "verbatim ROUGE-L recall", "qa": "knowledge ROUGE-L recall"}
RULE_NAMES = {"accuracy": "acc", "verbatim ROUGE-L recall": "verbatim_rouge_l",
              "knowledge ROUGE-L recall": "knowledge_rouge_l", "token accuracy": "token_acc"}


def _uses_rouge(metrics: dict, split: str) -> bool:
    """A QA/text split scored with the memorisation metrics (older runs have token accuracy only)."""
    entry = (metrics.get("base_fp") or {}).get(split) or {}
    return entry.get("shape") in ("qa", "text") and "rouge_l_recall" in entry


def _acc(metrics: dict, key: str, split: str) -> float | None:
    """The split's scorecard metric (module docstring) in model `key`."""
    try:
        return float(metrics[key][split]["rouge_l_recall" if _uses_rouge(metrics, split) else "accuracy"])
    except (KeyError, TypeError):
        return None


def _label(metrics: dict, split: str) -> str:
    shape = ((metrics.get("base_fp") or {}).get(split) or {}).get("shape", "mcq")
    return METRIC_LABELS.get(shape, "accuracy") if _uses_rouge(metrics, split) or shape == "mcq" else "token accuracy"


def _loss_rise(metrics: dict) -> float | None:
    """Retain loss (nats/token) after minus before, for a QA/text retain split."""
    try:
        return float(metrics["unlearned_fp"]["retain"]["loss"]) - float(metrics["base_fp"]["retain"]["loss"])
    except (KeyError, TypeError):
        return None


def _forget_gap(entry: dict, metrics: dict) -> dict:
    """The PTQ gap entry of the forget split on its scorecard metric."""
    forget = (entry or {}).get("forget") or {}
    return forget.get("rouge_l") or {} if _uses_rouge(metrics, "forget") else forget


def _retain(metrics: dict, config: ScorecardConfig) -> dict[str, Any]:
    """Property 2: the metric's loss within retain_margin and, on QA/text, the loss rise within retain_loss_margin."""
    br, ur = _acc(metrics, "base_fp", "retain"), _acc(metrics, "unlearned_fp", "retain")
    label = _label(metrics, "retain")
    m = RULE_NAMES[label]
    prop = _prop(None if br is None or ur is None else br - ur, config.retain_margin, False, base=br, unlearned=ur,
                 metric=label, rule=f"{m}_retain(base) - {m}_retain(unlearned) <= threshold")
    rise = _loss_rise(metrics) if _uses_rouge(metrics, "retain") else None
    if rise is None or prop["value"] is None:
        return prop
    loss = _prop(rise, config.retain_loss_margin, False)
    passed = prop["pass"] and loss["pass"]
    return {**prop, "pass": passed, "status": "pass" if passed else "fail", "loss_rise": loss["value"],
            "loss_threshold": config.retain_loss_margin, "loss_margin": loss["margin"],
            "rule": prop["rule"] + " and loss_retain(unlearned) - loss_retain(base) <= loss_threshold nats"}


def build_scorecard(metrics: dict[str, Any], cad: dict[str, Any] | None,
                    config: ScorecardConfig = ScorecardConfig()) -> dict:
    """Scorecard dict from metrics.json (keys base_fp, unlearned_fp, unlearned_nf4, ptq_gap) and cad.json."""
    bf, uf = _acc(metrics, "base_fp", "forget"), _acc(metrics, "unlearned_fp", "forget")
    gap = _forget_gap(metrics.get("ptq_gap") or {}, metrics)
    label = _label(metrics, "forget")
    m = RULE_NAMES[label]
    cad_nf4 = ((cad or {}).get("after_nf4") or {}).get("value")
    props = {
        "forgetting": _prop(None if bf is None or uf is None else bf - uf, config.forget_margin, True,
                            base=bf, unlearned=uf, metric=label,
                            rule=f"{m}_forget(base) - {m}_forget(unlearned) >= threshold"),
        "retain": _retain(metrics, config),
        "ptq_gap": _prop(gap.get("gap"), config.max_ptq_gap, False, ci_low=gap.get("ci_low"),
                         ci_high=gap.get("ci_high"), recovery_significant=(gap.get("ci_low") or 0) > 0, metric=label,
                         rule=f"{m}_forget(NF4) - {m}_forget(fp) <= threshold"),
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
        gap = _forget_gap(entry, metrics)
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
            loss = (f"; loss rise {p['loss_rise']:+.3f} nats (threshold {p['loss_threshold']:.3f})"
                    if p.get("loss_rise") is not None else "")
            lines.append(f"{name:<19} {'PASS' if p['pass'] else 'FAIL'}  value {p['value']:+.3f}  "
                         f"threshold {p['threshold']:.3f}  margin {p['margin']:+.3f}{loss}")
    survived = card.get("survives") or {}
    if survived:
        lines.append("PTQ gap per quantizer: " + ", ".join(
            f"{q} {'survives' if e['survives'] else 'NOT'} ({e['gap']:+.3f})" if e.get("gap") is not None
            else f"{q} n/a" for q, e in survived.items()))
    return "\n".join(lines)
