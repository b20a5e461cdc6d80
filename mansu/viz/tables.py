"""Table rows for the Runs page: status, method, model, data, scorecard badges and key numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mansu.viz.compare import accuracy, cad_value, forget_drop, ptq_gap
from mansu.viz.report import mark, scorecard_rows


def _name(value: Any) -> str:
    """The last two path components (".../demo/model" -> "demo/model"), or a hub id as given."""
    if not value:
        return "-"
    parts = Path(str(value)).parts
    return "/".join(parts[-2:])


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run_row(run_id: str, config: dict[str, Any], status: dict[str, Any], metrics: dict[str, Any],
            scorecard: dict[str, Any] | None, cad: dict[str, Any] | None) -> dict[str, Any]:
    """One row of the runs table (missing numbers are None, shown as empty cells)."""
    spec = config.get("spec") if isinstance(config.get("spec"), dict) else config
    demo = bool(config.get("demo"))
    forget_fp = accuracy(metrics, "unlearned_fp", "forget")
    forget_nf4 = accuracy(metrics, "unlearned_nf4", "forget")
    retain_fp = accuracy(metrics, "unlearned_fp", "retain")
    cad_nf4, fact_nf4 = cad_value(cad, "nf4"), cad_value(cad, "nf4", "per_fact")
    rows = scorecard_rows(scorecard)
    return {
        "run": run_id,
        "state": status.get("state", "?"),
        "stage": status.get("stage", "?"),
        "method": config.get("method", "-"),
        "model": "demo" if demo and not spec.get("model") else _name(spec.get("model")),
        "data": "demo world" if demo and not spec.get("forget") else _name(spec.get("forget")),
        "alignment": spec.get("base_alignment", "-"),
        "scorecard": " ".join(mark(r) for r in rows) if rows else "-",
        "passed": f"{sum(bool(r.passed) for r in rows)}/{len(rows)}" if rows else "-",
        "forget fp": _r(forget_fp.value if forget_fp else None),
        "forget NF4": _r(forget_nf4.value if forget_nf4 else None),
        "PTQ gap": _r(ptq_gap(metrics)),
        "forget drop": _r(forget_drop(metrics)),
        "retain fp": _r(retain_fp.value if retain_fp else None),
        "CAD NF4": _r(cad_nf4[0] if cad_nf4 else None),
        "CAD NF4 per fact": _r(fact_nf4[0] if fact_nf4 else None),
        "error": status.get("error") or "",
    }
