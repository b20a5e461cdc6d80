"""The method x quantizer PTQ-gap matrix (issue 11, item 7): for each base alignment, method and quantizer, the
forget-set PTQ gap acc(quantized) - acc(fp) pooled over seeds, with a 95% percentile-bootstrap interval.

The sign is the one of `mansu.quant.twin.paired_gap` and metrics.json's ptq_gap: positive means the quantized model
answers forgotten questions the full-precision model no longer answers.  Each run contributes one paired difference
per forget question, correct(quantized) - correct(fp), read from metrics.json (unlearned_fp.forget.correct and
unlearned_quant.<q>.forget.correct; unlearned_nf4 stands in for nf4 in runs from before per-quantizer scoring).
When every run of a cell scored the same questions, the bootstrap resamples questions with each question's
differences from all seeds kept together (a cluster bootstrap: a question is the unit sampled, seeds repeat it);
otherwise each (run, question) is its own unit.  The generator is seeded, so a matrix is reproducible.

Pure: reads only the metrics given to it (`MatrixRun`), writes nothing; `mansu compare`, the app and the reviewer
report all call `gap_matrix`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

N_BOOT = 2000  # bootstrap resamples: the CI ends move by < 0.005 between generator seeds at 120 questions
BOOT_SEED = 0


@dataclass(frozen=True)
class MatrixRun:
    """What the matrix needs of one run: where it sits (base alignment, method) and its metrics.json."""
    base: str
    method: str
    metrics: dict[str, Any]


@dataclass(frozen=True)
class GapCell:
    """One cell: the pooled forget PTQ gap of `method` under `quantizer` on `base`, with its 95% CI."""
    base: str
    method: str
    quantizer: str
    gap: float
    ci_low: float
    ci_high: float
    n_questions: int   # distinct units resampled (questions, or run-questions when the runs' sets differ)
    n_runs: int        # seeds pooled

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _correct(stage: Any) -> list[float] | None:
    forget = stage.get("forget") if isinstance(stage, dict) else None
    values = forget.get("correct") if isinstance(forget, dict) else None
    return [float(v) for v in values] if isinstance(values, list) and values else None


def paired_differences(metrics: dict[str, Any], quantizer: str) -> list[float] | None:
    """Per forget question, correct(quantized) - correct(fp) of one run; None when the run lacks either list."""
    fp = _correct((metrics or {}).get("unlearned_fp"))
    quant = ((metrics or {}).get("unlearned_quant") or {}).get(quantizer)
    if quant is None and quantizer == "nf4":
        quant = (metrics or {}).get("unlearned_nf4")
    q = _correct(quant)
    if fp is None or q is None or len(fp) != len(q):
        return None
    return [b - a for a, b in zip(fp, q)]


def pooled_gap(per_run: Sequence[Sequence[float]], *, n_boot: int = N_BOOT,
               seed: int = BOOT_SEED) -> tuple[float, float, float, int]:
    """(gap, ci_low, ci_high, units) from each run's paired differences, pooled over runs (see the module text)."""
    runs = [list(d) for d in per_run if len(d)]
    if not runs:
        raise ValueError("pooled gap needs at least one run with paired forget differences")
    if len({len(d) for d in runs}) == 1:  # the same questions in every run: one unit per question
        units = [sum(col) / len(col) for col in zip(*runs)]
    else:
        units = [x for d in runs for x in d]
    low, high = _percentile_ci(np.asarray(units, dtype=np.float64), n_boot, seed)
    return float(np.mean(units)), low, high, len(units)


def _percentile_ci(units: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (the method of mansu.metrics.accuracy.bootstrap_ci, in numpy:
    the app redraws a whole matrix on every rerun)."""
    idx = np.random.default_rng(seed).integers(0, len(units), (n_boot, len(units)))  # [n_boot, units]
    low, high = np.quantile(units[idx].mean(axis=1), [0.025, 0.975])
    return float(low), float(high)


def quantizers_of(runs: Iterable[MatrixRun]) -> list[str]:
    """The quantizers scored by any run (nf4 always: older runs have it as the headline), in the registry's order
    (metrics.json sorts its keys), others (calibrated ones) after them by name."""
    from mansu.quant.registry import QUANTIZERS

    names = {"nf4"}
    for run in runs:
        names.update((run.metrics.get("unlearned_quant") or {}) if isinstance(run.metrics, dict) else ())
    return [q for q in QUANTIZERS if q in names] + sorted(names - set(QUANTIZERS))


def gap_matrix(runs: Sequence[MatrixRun], *, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> list[GapCell]:
    """Every (base, method, quantizer) cell that at least one run can fill, in the runs' order of bases and methods."""
    runs = list(runs)
    cells = []
    for base in dict.fromkeys(r.base for r in runs):
        for method in dict.fromkeys(r.method for r in runs if r.base == base):
            group = [r for r in runs if r.base == base and r.method == method]
            for q in quantizers_of(runs):
                diffs = [d for d in (paired_differences(r.metrics, q) for r in group) if d is not None]
                if diffs:
                    gap, low, high, n = pooled_gap(diffs, n_boot=n_boot, seed=seed)
                    cells.append(GapCell(base, method, q, gap, low, high, n, len(diffs)))
    return cells


def cells_for(cells: Sequence[GapCell], base: str) -> tuple[list[str], list[str], dict[tuple[str, str], GapCell]]:
    """(methods, quantizers, {(method, quantizer): cell}) of one base, in first-seen order."""
    mine = [c for c in cells if c.base == base]
    return (list(dict.fromkeys(c.method for c in mine)), list(dict.fromkeys(c.quantizer for c in mine)),
            {(c.method, c.quantizer): c for c in mine})


def fmt_gap(value: float) -> str:
    text = f"{value:+.3f}"
    return "0.000" if text in ("+0.000", "-0.000") else text


def cell_text(cell: GapCell) -> str:
    """'+0.442 [+0.400, +0.483]': the gap and its 95% CI."""
    return f"{fmt_gap(cell.gap)} [{fmt_gap(cell.ci_low)}, {fmt_gap(cell.ci_high)}]"


def markdown_table(cells: Sequence[GapCell], base: str) -> str:
    """Method rows x quantizer columns of one base; a cell is the gap with its CI, bold when the CI excludes 0."""
    methods, quants, by = cells_for(cells, base)
    lines = ["| method | " + " | ".join(quants) + " |", "|" + "---|" * (len(quants) + 1)]
    for m in methods:
        row = [("n/a" if (m, q) not in by else
                f"**{cell_text(by[m, q])}**" if by[m, q].significant else cell_text(by[m, q])) for q in quants]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def summary(cells: Sequence[GapCell], base: str) -> str:
    """What the matrix of one base shows, in words generated from its cells: per quantizer, the methods whose
    forgetting it significantly undoes (CI above 0) with their gaps, the quantizers that undo none, those that
    lower forget accuracy further, and the methods that no quantizer undoes."""
    methods, quants, by = cells_for(cells, base)
    if not methods:
        return "No run of this base has per-question forget results: no matrix."
    n_runs = sorted({c.n_runs for c in cells if c.base == base})
    seeds = f"{n_runs[0]}" if len(n_runs) == 1 else f"{n_runs[0]}-{n_runs[-1]}"
    parts = [f"Pooled over {seeds} seed(s) per method; a bold cell's 95% interval excludes 0."]
    some = lambda q, test: [m for m in methods if (m, q) in by and test(by[m, q])]  # noqa: E731
    for q in quants:
        if up := some(q, lambda c: c.ci_low > 0):
            parts.append(f"{q} brings forgotten answers back (interval above 0) for "
                         f"{_join([f'{m} ({fmt_gap(by[m, q].gap)})' for m in up])}.")
    if none := [q for q in quants if not some(q, lambda c: c.ci_low > 0)]:
        parts.append(f"{_join(none)} {'brings' if len(none) == 1 else 'bring'} none back for any method.")
    for q in quants:
        if down := some(q, lambda c: c.ci_high < 0):
            parts.append(f"{q} lowers forget accuracy further (interval below 0) for {_join(down)}.")
    kept = [m for m in methods if all(by[m, q].ci_low <= 0 for q in quants if (m, q) in by)]
    parts.append(f"No quantizer significantly undoes what {_join(kept)} changed (whether a method forgot at all is "
                 "in the table above)." if kept
                 else "Every method has at least one quantizer that significantly brings forgotten answers back.")
    return " ".join(parts)
