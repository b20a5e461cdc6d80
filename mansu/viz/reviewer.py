"""The reviewer report: one self-contained HTML document that states the claim a run tests and its verdict, the
setup, the results with their 95% intervals, the key figures with captions, the limitations and the commands that
reproduce it; printable to A4 PDF from a browser (print stylesheet).

`reviewer_report(runs)` is pure: it reads only the RunSummary objects it is given (the first is the primary run,
the rest its comparison runs) and the run folders' figure artifacts, and writes no file.  The CLI
(`mansu report RUN [RUN ...] --out FILE`) and the app's Report page both call it, so they give the same document.
Every sentence with a number is generated from the runs' metrics.json, cad.json and scorecard.json; numbers are
shown to 3 significant digits.  No absolute path of the machine appears in it (`mansu.io.portable_paths`).
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import plotly.graph_objects as go

from mansu.attack.relearn import read_attacks
from mansu.io import portable_path, portable_paths
from mansu.matrix import GapCell, MatrixRun, cell_text, cells_for, gap_matrix, summary
from mansu.runs.store import RunSummary
from mansu.spec import DEMO, RunSpec, demo_spec
from mansu.unlearn.methods import METHODS
from mansu.unlearn.methods.base import COMMON_FIELDS
from mansu.viz.attack import attack_curves_figure
from mansu.viz.compare import CAD_ESTIMATORS, accuracy, cad_value, ptq_gap
from mansu.viz.matrix import gap_matrix_figure
from mansu.viz.quant import ptq_gap_by_quantizer_figure
from mansu.viz.report import PROPERTY_TITLES, run_figures, scorecard_rows, unique_labels

MATRIX = "PTQ-gap matrix"  # its figures are named "PTQ-gap matrix: <base> base"
SECTIONS = ("claim", "setup", "results", "figures", "limitations", "reproduce")
DEMO_MODEL = "demo (embedded Llama: 2 layers, 512 wide, 8 heads, 8.8M parameters)"
# the figures a reviewer needs, in order, with what to look at in each (run_figures' titles)
CAPTIONS = {
    "fp vs NF4 accuracy": "Forget and retain accuracy after unlearning, full precision (dark) vs NF4 (light), with "
                          "95% intervals. Look at the forget bars: a light bar taller than its dark one is a positive "
                          "PTQ gap (NF4 brings forgotten answers back).",
    "PTQ gap per quantizer": "The forget-set PTQ gap of the run under review for every quantizer it was scored "
                             "with (simulated, bit-exact), with paired 95% intervals; red bars are above the "
                             "scorecard's limit: there the quantized model recalls forgotten answers.",
    "suppression vs erasure (NF4)": "Each run as (fraction of the full-precision base's above-chance forget "
                                    "accuracy its NF4 model lost, CAD after NF4). Dashed lines: the scorecard's "
                                    "forget margin and CAD threshold. "
                                    "Top right is structural erasure; bottom right is behavioural suppression "
                                    "(accuracy dropped, circuit intact).",
    "update vs NF4 bin width": "Histogram of |update| / NF4 bin width over the updated weights (log x). Mass right "
                               "of 1.0 is an update large enough to change its 4-bit code, so it survives NF4; mass "
                               "far left of it rounds back to the base's code.",
    "NF4 codes changed": "Fraction of updated weights whose NF4 code changed, per tensor kind and layer.",
    "CAD": "Circuit Attribution Divergence of the forget circuit, before vs after unlearning (fp and NF4), with "
           "bootstrap 95% intervals (left), and the edges that contribute most (right). High CAD: the circuit that "
           "carried the forget behaviour changed, not only the output.",
    "diff before vs after_nf4": "The forget circuit's edges before unlearning, coloured by how their attribution "
                                "changed after unlearning + NF4 (green up, purple down).",
    "relearning attacks": "Forget accuracy (solid) and retain accuracy (dotted) of the unlearned model while an "
                          "attacker fine-tunes it (`mansu attack`): on a few forget records (relearn), on unrelated "
                          "records (relearn-unrelated), or as a LoRA on its frozen NF4 twin (quantize-relearn). A "
                          "curve climbing to the dashed base line is forgetting that comes back; the recovered "
                          "fractions with 95% intervals are in the run's certificate.json.",
    MATRIX: "The forget-set PTQ gap of every method of the report (rows) under every quantizer (columns), pooled "
            "over its seeds: red cells are quantizers that bring forgotten answers back, blue ones lower forget "
            "accuracy further, white is no change; * marks a 95% interval that excludes 0 (hover for it).",
}


def fmt(value: float | None, signed: bool = False) -> str:
    """3 significant digits ('n/a' when missing); signed puts + on positives (gaps, margins)."""
    if value is None:
        return "n/a"
    text = f"{value:+.3g}" if signed else f"{value:.3g}"
    return "0" if text in ("+0", "-0") else text


def fmt_ci(value: float | None, low: float | None, high: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    ci = "" if low is None or high is None else f" [{fmt(low, signed)}, {fmt(high, signed)}]"
    return fmt(value, signed) + ci


def _e(text: Any) -> str:
    return html.escape(str(text))


# ---------------------------------------------------------------- what a run is


def _spec(run: RunSummary) -> dict[str, Any]:
    spec = run.config.get("spec") if isinstance(run.config, dict) else None
    return spec if isinstance(spec, dict) else {}


def _unlearn(run: RunSummary) -> dict[str, Any]:
    unlearn = _spec(run).get("unlearn")
    return unlearn if isinstance(unlearn, dict) else {}


def method_of(run: RunSummary) -> str:
    return str(_unlearn(run).get("method") or run.config.get("method") or "?")


def base_of(run: RunSummary) -> str:
    return str(_spec(run).get("base_alignment", "?"))


def model_name(spec: dict[str, Any]) -> str:
    """'demo ...', a hub id as given, or a local model folder's name (never the machine's path)."""
    model = str(spec.get("model", "?"))
    if model == DEMO:
        return DEMO_MODEL
    return Path(model).name if model.startswith(("/", "~", ".")) else model


def data_name(spec: dict[str, Any], split: str) -> str:
    value = str(spec.get(split) or "")
    if not value or str(spec.get("model")) == DEMO:
        return f"demo world, {split} split" if not value else f"demo world, {Path(value).name}"
    return Path(value).name


def labels_of(runs: list[RunSummary]) -> list[str]:
    """The runs' labels in legends, tables and headings (unique: a shared label gets the run id)."""
    return unique_labels(runs)


# ---------------------------------------------------------------- claim and verdict


def _acc_text(run: RunSummary, stage: str, split: str) -> str:
    acc = accuracy(run.metrics, stage, split)
    return "n/a" if acc is None else fmt(acc.value)


def _gap(run: RunSummary) -> tuple[float | None, float | None, float | None]:
    entry = ((run.metrics or {}).get("ptq_gap") or {}).get("forget") or {}
    return ptq_gap(run.metrics), entry.get("ci_low"), entry.get("ci_high")


def gap_verdict(run: RunSummary) -> str:
    gap, low, high = _gap(run)
    if gap is None:
        return "the PTQ gap was not computed"
    if low is not None and low > 0:
        return "NF4 significantly brings forgotten answers back (the interval lies above 0)"
    if gap > 0:
        return "NF4 brings some answers back, but the interval includes 0 (not significant at this size)"
    return "NF4 does not bring forgotten answers back (gap at or below 0)"


def _failing(run: RunSummary) -> list[str]:
    return [PROPERTY_TITLES.get(r.name, r.name) for r in scorecard_rows(run.scorecard) if r.passed is not True]


def _moved(run: RunSummary) -> str:
    """'lowered forget accuracy from X to Y' (or raised, or left it at X), as the numbers say."""
    before, after = accuracy(run.metrics, "base_fp", "forget"), accuracy(run.metrics, "unlearned_fp", "forget")
    if before is None or after is None:
        return "has no forget accuracy to compare"
    if fmt(before.value) == fmt(after.value):
        return f"left forget accuracy at {fmt(after.value)}"
    verb = "lowered" if after.value < before.value else "raised"
    return f"{verb} forget accuracy from {fmt(before.value)} to {fmt(after.value)}"


def run_sentence(run: RunSummary, label: str) -> str:
    """One sentence of numbers for a run: forget fp and NF4, the gap with its CI, retain, CAD, properties passed."""
    if not run.metrics:
        return f"{label}: no evaluation yet (state {run.status.get('state', '?')})."
    gap, low, high = _gap(run)
    cad, fact = cad_value(run.cad, "nf4"), cad_value(run.cad, "nf4", "per_fact")
    rows = scorecard_rows(run.scorecard)
    n_pass = sum(r.passed is True for r in rows)
    failing = _failing(run)
    parts = [f"{method_of(run)} {_moved(run)} in full precision; after NF4 it is "
             f"{_acc_text(run, 'unlearned_nf4', 'forget')} (PTQ gap {fmt_ci(gap, low, high, signed=True)}, 95% CI): "
             f"{gap_verdict(run)}.",
             f"Retain accuracy went from {_acc_text(run, 'base_fp', 'retain')} to "
             f"{_acc_text(run, 'unlearned_fp', 'retain')} (NF4 {_acc_text(run, 'unlearned_nf4', 'retain')}).",
             "CAD after NF4 was not computed." if cad is None else
             f"CAD after NF4 is {fmt_ci(*cad)}" + (f" (per fact {fmt_ci(*fact)})." if fact else "."),
             f"It passes {n_pass} of {len(rows) or 4} scorecard properties"
             + (f" (not: {', '.join(failing)})." if failing else ".")]
    return " ".join(parts)


def claim_html(runs: list[RunSummary], labels: list[str]) -> str:
    primary = runs[0]
    spec = _spec(primary)
    intro = ("The claim under test: unlearning that is judged in full precision can be undone by 4-bit NF4 "
             "post-training quantization (a positive PTQ gap on the forget set), while MANSU's update, floored past "
             "the NF4 bin width, survives it and erases the forget circuit (SPEC.md, the paper's Sec. 4).")
    where = (f"On <b>{_e(model_name(spec))}</b> with the <b>{_e(base_of(primary))}</b> base, "
             f"run <b>{_e(labels[0])}</b>: ")
    body = [f"<p>{_e(intro)}</p>", f"<p class='verdict'>{where}{_e(run_sentence(primary, method_of(primary)))}</p>"]
    for run, label in zip(runs[1:], labels[1:]):
        body.append(f"<p>For comparison, <b>{_e(label)}</b>: {_e(run_sentence(run, method_of(run)))}</p>")
    body.append(f"<p><b>Verdict:</b> {_e(verdict(runs, labels))}</p>")
    return _section("claim", "Claim and verdict", "".join(body))


def _gap_words(run: RunSummary) -> str:
    gap, low, _ = _gap(run)
    if gap is None:
        return "PTQ gap not computed"
    sig = "significant" if low is not None and low > 0 else "its CI includes 0" if gap > 0 else "no recovery"
    return f"PTQ gap {fmt(gap, signed=True)}, {sig}"


def verdict(runs: list[RunSummary], labels: list[str]) -> str:
    """Plain words: does the primary run show quantization-permanent forgetting, and do its comparisons recover."""
    primary = runs[0]
    if not primary.metrics:
        return "no verdict yet: the primary run has no evaluation."
    rows = scorecard_rows(primary.scorecard)
    n_pass = sum(r.passed is True for r in rows)
    status = {r.name: r.passed for r in rows}
    if status.get("forgetting") and status.get("ptq_gap"):
        head = f"{labels[0]} forgets, and the forgetting survives NF4"
    elif status.get("forgetting"):
        head = f"{labels[0]} forgets in full precision, but NF4 brings some of it back"
    else:
        head = f"{labels[0]} does not forget enough in full precision for NF4 permanence to be tested"
    head += f" ({_gap_words(primary)}); it passes {n_pass} of {len(rows) or 4} properties"
    tail = [f"{label}: {_gap_words(r)}, passes {sum(x.passed is True for x in scorecard_rows(r.scorecard))} of 4"
            for r, label in zip(runs[1:], labels[1:]) if r.metrics]
    return head + (f". Compared with {'; '.join(tail)}." if tail else ".")


# ---------------------------------------------------------------- setup


def _alignment_text(run: RunSummary) -> str:
    diag = (run.metrics or {}).get("base_alignment")
    base = base_of(run)
    if not isinstance(diag, dict) or diag.get("frac_on_grid") is None:
        return f"{base} (diagnostic not recorded)"
    n = diag.get("n_weights")
    return (f"{base}: {fmt(100 * diag['frac_on_grid'])}% of {f'{n:,}' if isinstance(n, int) else '?'} quantizable "
            f"weights on the NF4 grid; mean distance to the nearest NF4 level {fmt(diag.get('mean_distance'))} "
            "bin widths")


def _method_settings(run: RunSummary) -> str:
    """The UnlearnConfig fields the method reads (METHODS[method].fields), with their values."""
    unlearn, method = _unlearn(run), method_of(run)
    names = [*COMMON_FIELDS, *(METHODS[method].fields if method in METHODS else ())]
    return ", ".join(f"{n}={unlearn[n]:g}" if isinstance(unlearn.get(n), float) else f"{n}={unlearn[n]}"
                     for n in dict.fromkeys(names) if n in unlearn) or "not recorded"


def _split_size(run: RunSummary, split: str) -> str:
    result = ((run.metrics or {}).get("base_fp") or {}).get(split) or {}
    n = result.get("n")
    return f"{n} records scored" if n is not None else "size not recorded"


def _versions(run: RunSummary) -> str:
    versions = dict(run.config.get("versions") or {})
    st = run.config.get("_stamp") or {}
    head = f"mansu {st.get('mansu_version', '?')} (commit {str(st.get('git_commit', '?'))[:10]})"
    return head + "; " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v != "not installed")


def _quantizer(run: RunSummary) -> str:
    spec, unlearn = _spec(run), _unlearn(run)
    mode = spec.get("nf4_mode", "simulated")
    how = "bit-exact dequantized simulation of bitsandbytes" if mode == "simulated" else "bitsandbytes 4-bit layers"
    scored = f"; scored: {spec['quantizers']}" if spec.get("quantizers") else ""
    return f"NF4, blockwise absmax, blocksize {unlearn.get('blocksize', 64)} ({mode}: {how}){scored}; fp = fp32"


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "not recorded"


def _kappa(run: RunSummary) -> str:
    """κ where the method reads it (MANSU and its ablations); other methods have no floor."""
    method = method_of(run)
    if method in METHODS and "kappa" not in METHODS[method].fields:
        return f"none ({method} has no magnitude floor)"
    return str(_unlearn(run).get("kappa", "?"))


def _seeds(runs: list[RunSummary]) -> str:
    groups: dict[tuple[str, str], list[str]] = {}
    for r in runs:
        groups.setdefault((method_of(r), base_of(r)), []).append(str(_unlearn(r).get("seed", "?")))
    return "; ".join(f"{m} on {b}: {len(s)} seed{'s' if len(s) > 1 else ''} ({', '.join(s)})"
                     for (m, b), s in groups.items())


SETUP_ROWS: tuple[tuple[str, Any], ...] = (
    ("model", lambda r: model_name(_spec(r))),
    ("quantizable coordinates", lambda r: _count((r.metrics.get("unlearn") or {}).get("n_coordinates"))),
    ("forget data", lambda r: f"{data_name(_spec(r), 'forget')} ({_split_size(r, 'forget')})"),
    ("retain data", lambda r: f"{data_name(_spec(r), 'retain')} ({_split_size(r, 'retain')})"),
    ("MCQ scoring", lambda r: str(_spec(r).get("fmt", "?"))),
    ("base alignment", _alignment_text),
    ("quantizer", _quantizer),
    ("method", method_of),
    ("seed", lambda r: str(_unlearn(r).get("seed", "?"))),
    ("method settings", _method_settings),
    ("κ (floor, bin widths)", _kappa),
    ("attribution", lambda r: "off" if _spec(r).get("attribution") is False else
        f"EAP-IG, {_spec(r).get('attribution_records', '?')} forget records, {_spec(r).get('ig_steps', '?')} steps, "
        f"circuit faithfulness {_spec(r).get('circuit_target', '?')}"),
    ("scorecard thresholds", lambda r: ", ".join(f"{k} {v:g}" for k, v in sorted(
        ((r.scorecard or {}).get("config") or _spec(r).get("scorecard") or {}).items()))),
    ("software", _versions),
)


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{cls}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def setup_html(runs: list[RunSummary], labels: list[str]) -> str:
    rows = [[_e(name), *(_e(portable_paths(get(r))) for r in runs)] for name, get in SETUP_ROWS]
    seeds = f"<p>Seeds: {_e(_seeds(runs))}.</p>"
    return _section("setup", "Setup", _table(["", *labels], rows, "setup") + seeds)


# ---------------------------------------------------------------- results

STAGE_NAMES = (("base_fp", "base, fp"), ("base_nf4", "base, NF4"), ("unlearned_fp", "unlearned, fp"),
               ("unlearned_nf4", "unlearned, NF4"))


def _acc_ci(run: RunSummary, stage: str, split: str) -> str:
    acc = accuracy(run.metrics, stage, split)
    return "n/a" if acc is None else fmt_ci(acc.value, acc.low, acc.high)


def results_rows(run: RunSummary) -> list[tuple[str, str]]:
    """(quantity, value with 95% CI) for one run, as shown in the results table."""
    rows = [(f"forget accuracy, {name}", _acc_ci(run, stage, "forget")) for stage, name in STAGE_NAMES]
    rows.append(("PTQ gap (forget, NF4 − fp)", fmt_ci(*_gap(run), signed=True)))
    by_quantizer = (run.metrics or {}).get("ptq_gap_by_quantizer")
    for q, entry in (by_quantizer.items() if isinstance(by_quantizer, dict) else ()):
        g = (entry or {}).get("forget") if isinstance(entry, dict) else None
        if isinstance(g, dict) and q != "nf4":
            rows.append((f"PTQ gap (forget, {q} − fp)", fmt_ci(g.get("gap"), g.get("ci_low"), g.get("ci_high"),
                                                              signed=True)))
    rows += [(f"retain accuracy, {name}", _acc_ci(run, stage, "retain")) for stage, name in STAGE_NAMES]
    for estimator, label in CAD_ESTIMATORS.items():
        for which in ("fp", "nf4"):
            cad = cad_value(run.cad, which, estimator)
            rows.append((f"CAD after {which.replace('nf4', 'NF4')}, {label}", "n/a" if cad is None else fmt_ci(*cad)))
    surv = (run.metrics or {}).get("survival") or {}
    rows.append(("median |update| / NF4 bin width", fmt(surv.get("median_ratio"))))
    rows.append(("fraction of updated weights whose NF4 code changed", fmt(surv.get("frac_code_changed"))))
    touched = ((run.metrics or {}).get("unlearn") or {}).get("n_params_touched")
    rows.append(("weights changed", "n/a" if touched is None else f"{touched:,}"))
    return rows


def _score_cell(run: RunSummary, name: str) -> str:
    row = next((r for r in scorecard_rows(run.scorecard) if r.name == name), None)
    if row is None:
        return "n/a"
    word = {True: "pass", False: "fail", None: "not available"}[row.passed]
    op = "≥" if name in ("forgetting", "structural_erasure") else "≤"
    return (f"<span class='{word.replace(' ', '-')}'>{word}</span>: {fmt(row.value)} "
            f"({op} {fmt(row.threshold)}, margin {fmt(row.margin, signed=True)})")


def matrix_cells(runs: list[RunSummary]) -> list[GapCell]:
    """The method x quantizer PTQ-gap matrix of the report's runs (mansu.matrix), or [] unless it covers several
    methods (for one method the per-quantizer figure says the same)."""
    cells = gap_matrix([MatrixRun(base_of(r), method_of(r), r.metrics) for r in runs if r.metrics])
    return cells if len({c.method for c in cells}) > 1 else []


def matrix_html(cells: list[GapCell]) -> str:
    """Per base: the matrix as a table (a cell whose interval excludes 0 in bold) and what it shows in words."""
    parts = []
    for base in dict.fromkeys(c.base for c in cells):
        methods, quants, by = cells_for(cells, base)
        rows = [[_e(m), *("n/a" if (m, q) not in by else f"<b>{_e(cell_text(by[m, q]))}</b>"
                          if by[m, q].significant else _e(cell_text(by[m, q])) for q in quants)] for m in methods]
        parts.append(f"<h3>{MATRIX}, {_e(base)} base (forget, quantized − fp, 95% CI)</h3>"
                     + _table(["method", *quants], rows, "matrix") + f"<p>{_e(summary(cells, base))}</p>")
    return "".join(parts)


def results_html(runs: list[RunSummary], labels: list[str], cells: list[GapCell] | None = None) -> str:
    per_run = [dict(results_rows(r)) for r in runs]
    names = list(dict.fromkeys(n for p in per_run for n in p))  # quantizers may differ between runs
    table = _table(["quantity (95% CI)", *labels],
                   [[_e(n), *(_e(p.get(n, "n/a")) for p in per_run)] for n in names], "results")
    card = _table(["scorecard property", *labels],
                  [[_e(PROPERTY_TITLES[p]), *(_score_cell(r, p) for r in runs)] for p in PROPERTY_TITLES], "scorecard")
    note = ("<p class='note'>Accuracies are cloze MCQ accuracies with bootstrap 95% intervals; the PTQ gap is paired "
            "(the same questions, fp vs NF4). Numbers are shown to 3 significant digits.</p>")
    return _section("results", "Results", table + card + note + matrix_html(cells or []))


# ---------------------------------------------------------------- figures, limitations, reproduce


def figures_html(figures: dict[str, go.Figure], missing: list[str]) -> str:
    parts = []
    for i, (name, fig) in enumerate(figures.items()):
        div = fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"fig{i}", default_width="100%",
                          config={"displaylogo": False, "responsive": True})
        parts.append(f"<figure>{div}<figcaption><b>Figure {i + 1}. {_e(name)}.</b> {_e(CAPTIONS[name.split(':')[0]])}"
                     "</figcaption></figure>")
    if not figures:
        parts.append("<p>No figure: the run has no evaluation or attribution artifacts yet.</p>")
    parts += [f"<p class='note'>{_e(m)}: not computed for this run.</p>" for m in missing]
    return _section("figures", "Figures", "".join(parts))


def limitations(runs: list[RunSummary]) -> list[str]:
    """What a reviewer must not read into these numbers, from what the runs are."""
    bases = {base_of(r) for r in runs}
    items = ["MANSU is a reconstruction from the paper's text (arXiv 2605.15138): the paper's code is not public and "
             "its Sec. 4 and appendices B-E (exact equations) were not available; where the text is silent mansu "
             "chose the most faithful reading (SPEC.md, docs/unlearning.md). Numbers here are mansu's, not the "
             "paper's."]
    aligned = sorted(b for b in bases if b not in ("natural", "?"))
    if aligned:
        items.append(f"On the grid-aligned base ({', '.join(aligned)}) the quantizable weights (or the stated "
                     "fraction of their blocks) were first snapped to the quantizer's round trip, so an update below "
                     "half a bin rounds back to the base's code: the dual failure (fp forgetting that NF4 undoes) "
                     "depends on that alignment (a checkpoint distributed as dequantized NF4, a QLoRA merge) and is "
                     "not expected on a natural base.")
    if "natural" in bases:
        items.append("On the natural base weights lie at random places inside their NF4 cells: NF4 dithers sub-bin "
                     "updates and keeps their mean, so a PTQ gap near 0 there is expected for every method.")
    if any(str(_spec(r).get("model")) == DEMO for r in runs):
        n = next((((r.metrics or {}).get("base_fp") or {}).get("forget", {}).get("n") for r in runs if r.metrics), None)
        items.append("Demo scale: a 2-layer, 8.8M-parameter Llama trained on a generated, fictitious knowledge base "
                     f"({n or 'a few hundred'} forget questions). It shows the mechanism, not the paper's 8B-scale "
                     "numbers; with this few questions an accuracy interval is several points wide.")
    seeds = Counter((method_of(r), base_of(r)) for r in runs)
    if max(seeds.values()) < 3:
        items.append("Fewer than 3 seeds per method and base: seed-to-seed variation is not shown here "
                     "(`mansu compare --seeds 3` reports mean ± sd over seeds, docs/results.md).")
    if any(_spec(r).get("nf4_mode", "simulated") == "simulated" for r in runs):
        items.append("NF4 is simulated (bit-exact bitsandbytes dequantization, fp32 matmul); real bitsandbytes CPU "
                     "kernels compute in bf16 and differ slightly.")
    items.append("CAD depends on the attribution settings (records, IG steps, circuit target) shown in Setup; it "
                 "measures change of the original circuit, not the absence of the knowledge elsewhere.")
    return items


def limitations_html(runs: list[RunSummary]) -> str:
    return _section("limitations", "Limitations", "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in limitations(runs))
                    + "</ul>")


def reproduce_command(run: RunSummary) -> str:
    """The shortest command that makes this run again: the demo flags when the spec is a demo spec, else --spec."""
    spec, unlearn = _spec(run), _unlearn(run)
    if spec.get("model") == DEMO:
        try:
            demo = demo_spec(method_of(run), seed=unlearn.get("seed", 0),
                             base_alignment=spec.get("base_alignment", "nf4-grid"))
            if RunSpec.from_dict(spec) == demo:
                return (f"mansu run --demo --method {method_of(run)} --seed {unlearn.get('seed', 0)} "
                        f"--base-alignment {spec.get('base_alignment')}")
        except (ValueError, TypeError, KeyError):
            pass
    return f"mansu run --spec {run.run_id}.spec.json"


def reproduce_html(runs: list[RunSummary], labels: list[str]) -> str:
    parts = []
    for run, label in zip(runs, labels):
        spec_json = json.dumps(portable_paths(_spec(run)), indent=1, sort_keys=True)
        href = "data:application/json;charset=utf-8," + quote(spec_json + "\n")
        parts.append(f"<h3>{_e(label)}</h3><pre class='cmd'>{_e(reproduce_command(run))}</pre>"
                     f"<details open><summary>{_e(run.run_id)}.spec.json (the run's spec, as saved; "
                     f"<a download='{_e(run.run_id)}.spec.json' href='{_e(href)}'>save it</a>)</summary>"
                     f"<pre>{_e(spec_json)}</pre></details>")
    report = "mansu report " + " ".join(r.run_id for r in runs) + " --out report.html"
    parts.append(f"<p>This report: <code>{_e(report)}</code> (or the app's Report page).</p>")
    intro = ("<p>Every run below can be made again with its command (a demo run) or with its spec saved as "
             "<code>&lt;run id&gt;.spec.json</code> and <code>mansu run --spec</code>; paths under "
             "<code>$MANSU_HOME</code> and <code>$MANSU_RUNS</code> stand for this machine's folders.</p>")
    return _section("reproduce", "Reproduce", intro + "".join(parts))


# ---------------------------------------------------------------- the document


def _section(ident: str, heading: str, body: str) -> str:
    return f"<section id='{ident}'><h2>{_e(heading)}</h2>{body}</section>"


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}
.pass{color:#17692b;font-weight:600}.fail{color:#a3171b;font-weight:600}.not-available{color:#777}
.verdict{background:#f4f8ff;border-left:4px solid #3a6fd8;padding:.6em .9em}
pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:12px;white-space:pre-wrap}
figure{margin:1.2em 0;break-inside:avoid}figcaption{font-size:.9em;color:#333;margin-top:.3em}
.note{color:#555;font-size:.9em}.toolbar{float:right}
@page{size:A4;margin:14mm}
@media print{
 body{max-width:none;margin:0;padding:0;font-size:10pt}
 .toolbar,.modebar,.modebar-container,details>summary::marker{display:none!important}
 section{break-before:page}section#claim{break-before:avoid}
 table,figure,pre{break-inside:avoid}
 .js-plotly-plot,.plot-container,figure>div{width:180mm!important;max-width:180mm!important}
 a{color:inherit;text-decoration:none}
}
"""

# plotly sizes a figure once; resize it to the A4 text width for printing and back afterwards
PRINT_JS = """<script>
(function(){function each(f){document.querySelectorAll('.js-plotly-plot').forEach(function(g){
 if(window.Plotly){f(g);}});}
 window.addEventListener('beforeprint',function(){each(function(g){Plotly.relayout(g,{width:680});});});
 window.addEventListener('afterprint',function(){each(function(g){Plotly.relayout(g,{width:null,autosize:true});});});
})();</script>"""


def _max_gap(run: RunSummary) -> float:
    config = (run.scorecard or {}).get("config") or _spec(run).get("scorecard") or {}
    return float(config.get("max_ptq_gap", 0.0))


def reviewer_report(runs: list[RunSummary], *, generated: str | None = None) -> str:
    """The reviewer report of `runs[0]` compared with `runs[1:]`, as one self-contained HTML document."""
    if not runs:
        raise ValueError("a report needs at least one run")
    labels = labels_of(runs)
    figs, missing = run_figures(runs[0], runs[1:])
    by_quantizer = ptq_gap_by_quantizer_figure(runs[0].metrics, _max_gap(runs[0]))
    if by_quantizer is not None:
        figs["PTQ gap per quantizer"] = by_quantizer
    curves = attack_curves_figure(read_attacks(runs[0].path))
    if curves is not None:
        figs["relearning attacks"] = curves
    figures = {name: figs[name] for name in CAPTIONS if name in figs}
    cells = matrix_cells(runs)
    figures.update({f"{MATRIX}: {b} base": gap_matrix_figure(cells, b) for b in dict.fromkeys(c.base for c in cells)})
    title = f"mansu reviewer report: {labels[0]}" + (f" vs {', '.join(labels[1:])}" if runs[1:] else "")
    stamp = (runs[0].config.get("_stamp") or {}) if isinstance(runs[0].config, dict) else {}
    sub = (f"runs {', '.join(r.run_id for r in runs)}" + (f" · generated {generated}" if generated else "")
           + f" · mansu {stamp.get('mansu_version', '?')}")
    toc = " · ".join(f"<a href='#{s}'>{s}</a>" for s in SECTIONS)
    body = [claim_html(runs, labels), setup_html(runs, labels), results_html(runs, labels, cells),
            figures_html(figures, missing), limitations_html(runs), reproduce_html(runs, labels)]
    doc = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
           f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>"
           f"<div class='toolbar'><button onclick='window.print()'>Print / save as PDF</button></div>"
           f"<h1>{_e(title)}</h1><p class='sub'>{_e(sub)}</p><nav class='toolbar-nav'>{toc}</nav>"
           + "\n".join(body) + PRINT_JS + "</body></html>")
    return _scrub(doc, runs)


def _scrub(doc: str, runs: list[RunSummary]) -> str:
    """Replace any run folder path left in the text (e.g. in a figure's hover text) by its portable form."""
    for run in runs:
        doc = doc.replace(str(Path(run.path)), portable_path(str(Path(run.path))))
    return doc
