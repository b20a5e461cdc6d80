"""`python -m mansu compare`: MANSU and every baseline on the demo world, several seeds, both base alignments;
writes the generated table docs/results.md (and a JSON twin next to the runs).

Seed s is a pair (`--model-seeds paired`, the default): the demo model trained with seed s (mansu.models.demo; the
same world and recipe, its own init and data order; built first when missing) and unlearning seed s, so the
spread over seeds covers both the model and the unlearning run. `--model-seeds same` keeps demo model 0 for every
seed (the spread is then the unlearning seed's alone).

Each (base, method, seed) is a normal run folder (the app lists them).  Runs on the same base share the base
evaluation, the circuit and the engine's base statistics (BaseCache); models are not saved (store_update off)
to keep the comparison within minutes.  Retain accuracy is scored on the first `--retain-eval-limit` retain
records (the same records for every method and the base).  The method x quantizer PTQ-gap matrix (mansu.matrix) is
computed from the finished runs' metrics.json, pooled over seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from mansu.io import mean_sd, read_json, write_json_atomic
from mansu.matrix import GapCell, MatrixRun, gap_matrix, markdown_table, summary
from mansu.models.demo import demo_assets, ensure_demo, is_complete
from mansu.paths import runs_root
from mansu.pipeline import BaseCache, run_pipeline, start_run
from mansu.runs import layout
from mansu.runs.store import read_metrics
from mansu.scorecard import ScorecardConfig
from mansu.spec import RunSpec, demo_spec
from mansu.unlearn.demo_settings import DEMO_ATTRIBUTION, demo_settings
from mansu.unlearn.methods import METHODS

NATURAL_METHODS = ("mansu", "graddiff")
MODEL_SEEDS = {"paired": "seed s runs on demo model seed s", "same": "every seed runs on demo model seed 0"}
KEPT_SECTIONS = ("## Relearning attacks",)  # written from `mansu attack` results (docs/attacks.md), not by compare
DATA_FLAGS = {"forget": "forget set", "retain": "retain set", "forget_eval": "forget set scored",
              "retain_eval": "retain set scored", "holdout": "records never trained on (membership AUC; QA/text)"}


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="MANSU vs every baseline on the demo world (writes docs/results.md)",
                              description="Run MANSU, its ablations and the baselines on the demo world over several "
                                          "seeds, on the NF4-grid-aligned base (all methods) and the natural base "
                                          "(a subset), and write a generated results table.")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    p.add_argument("--model-seeds", choices=list(MODEL_SEEDS), default="paired",
                   help="paired (default): seed s runs on the demo model trained with seed s (built when missing) "
                        "and unlearns with seed s; same: every seed on demo model 0")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods on the grid base")
    p.add_argument("--natural-methods", default=",".join(NATURAL_METHODS),
                   help="comma-separated methods also run on the natural base ('' for none)")
    p.add_argument("--retain-eval-limit", type=int, default=200, help="retain records scored (default 200)")
    p.add_argument("--attribution-records", type=int, default=DEMO_ATTRIBUTION["attribution_records"],
                   help="forget records attributed for CAD (default %(default)s, the demo's whole forget set: "
                        "per-fact CAD's 95%% CI is about +-0.04 there; mansu.attribution.cad)")
    p.add_argument("--ig-steps", type=int, default=DEMO_ATTRIBUTION["ig_steps"],
                   help="EAP-IG steps for CAD (default %(default)s)")
    p.add_argument("--output", default="docs/results.md", help="where to write the table (default docs/results.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is much faster when other processes share the cores)")
    for name, what in DATA_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), default="", metavar="FILE",
                       help=f"{what} (MCQ, QA or text records; default: the demo's)")
    p.add_argument("--template", default=None, help="prompt template of MCQ and QA records (run's --template)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override a demo setting, e.g. --set mansu.update_fraction=0.001")
    p.set_defaults(func=handle)


def _settings(args) -> dict[str, dict]:
    settings = {m: demo_settings(m) for m in METHODS}
    for item in args.set:
        try:
            lhs, raw = item.split("=", 1)
            method, key = lhs.split(".", 1)
        except ValueError:
            raise ValueError(f"--set expects METHOD.KEY=VALUE, got {item!r}") from None
        if method not in settings:
            raise ValueError(f"--set names unknown method {method!r}; accepted are {', '.join(settings)}")
        settings[method][key] = json.loads(raw)
    return settings


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; accepted are {', '.join(METHODS)}")
    return names


def plan(args) -> list[tuple[str, str, int, int]]:
    """The jobs (base, method, unlearning seed, demo model seed), seed-major."""
    if not 1 <= args.seeds <= 20:
        raise ValueError(f"--seeds must be in [1, 20], got {args.seeds}")
    if args.model_seeds not in MODEL_SEEDS:
        raise ValueError(f"--model-seeds must be one of {', '.join(MODEL_SEEDS)}, got {args.model_seeds!r}")
    grid, natural = _methods(args.methods), _methods(args.natural_methods)
    # seed-major order: a partial table (written after every run) already covers every method and model
    return [(base, m, s, s if args.model_seeds == "paired" else 0) for s in range(args.seeds)
            for base, methods in (("nf4-grid", grid), ("natural", natural)) for m in methods]


def build_models(seeds: Sequence[int], threads: int | None) -> None:
    """Build the demo models of `seeds` that are missing, one line each (a build takes minutes on 2 cores)."""
    import sys

    for seed in dict.fromkeys(seeds):
        if is_complete(demo_assets(model_seed=seed)):
            continue
        print(f"building demo model seed {seed} under {demo_assets(model_seed=seed).root} (same world and recipe, "
              "its own init and data order; minutes on 2 cores)", file=sys.stderr, flush=True)
        ensure_demo(model_seed=seed, threads=threads)


def handle(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None:
        if not 1 <= args.threads <= 256:
            raise ValueError(f"--threads must be in [1, 256], got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = _settings(args)
    jobs = plan(args)
    data = {k: getattr(args, k) for k in DATA_FLAGS if getattr(args, k)}
    data.update({"template": args.template} if args.template else {})
    specs = [demo_spec(method, **{**settings[method], "seed": seed}, base_alignment=base, **data,  # validated first
                       model_seed=model_seed, retain_eval_limit=args.retain_eval_limit, save_model=False,
                       store_update=False, attribution_records=args.attribution_records, ig_steps=args.ig_steps)
             for base, method, seed, model_seed in jobs]
    build_models([spec.model_seed for spec in specs], args.threads)
    t0 = time.perf_counter()
    caches = {(spec.base_alignment, spec.model_seed): BaseCache() for spec in specs}  # one per base and model
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial_path = out.with_name(out.stem + ".partial" + out.suffix)  # never over the finished table
    rows: list[dict] = []
    matrix_runs: list[MatrixRun] = []
    cells: list[GapCell] = []
    for i, spec in enumerate(specs):
        rows.append(_run_one(spec, caches[spec.base_alignment, spec.model_seed], i, len(specs)))
        if "error" not in rows[-1]:
            matrix_runs.append(_matrix_run(rows[-1]))
        cells = gap_matrix(matrix_runs)
        partial = f"PARTIAL: {len(rows)} of {len(specs)} runs finished so far." if len(rows) < len(specs) else ""
        partial_path.write_text(render(rows, caches, settings, time.perf_counter() - t0, args, partial, cells=cells))
    total = time.perf_counter() - t0
    write_json_atomic(runs_root() / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json",
                      {"rows": rows, "wall_seconds": total, "settings": settings,
                       "ptq_gap_matrix": [c.to_dict() for c in cells],
                       "base_metrics": {f"{base}/model-seed{ms}": c.metrics for (base, ms), c in caches.items()}},
                      add_stamp=True)
    partial_path.write_text(render(rows, caches, settings, total, args, cells=cells) + kept_sections(out))
    os.replace(partial_path, out)
    print(f"wrote {out} ({len(rows)} runs, {total / 60:.1f} min)")
    return 0


def _run_one(spec: RunSpec, cache: BaseCache, i: int, n: int) -> dict:
    run = start_run(spec)
    cfg = spec.config
    logging.getLogger(__name__).warning("compare %d/%d: %s seed %d on %s base, demo model seed %d", i + 1, n,
                                        cfg.method, cfg.seed, spec.base_alignment, spec.model_seed)
    row = {"run_id": run.name, "method": cfg.method, "seed": cfg.seed, "model_seed": spec.model_seed,
           "base": spec.base_alignment}
    try:
        card = run_pipeline(run, cache)
    except Exception as exc:  # one failed run must not lose the others: it is reported in the table
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    m = read_json(run / layout.METRICS)
    cad = read_json(run / layout.CAD) if (run / layout.CAD).is_file() else {}
    gap = m["ptq_gap"]["forget"].get("rouge_l") or m["ptq_gap"]["forget"]  # QA/text: the ROUGE-L recall's gap
    return {**row, "metric": metric_name(m["unlearned_fp"]["forget"]),
            "forget_fp": headline(m["unlearned_fp"]["forget"]), "forget_nf4": headline(m["unlearned_nf4"]["forget"]),
            "ptq_gap": gap["gap"], "ptq_gap_ci": [gap["ci_low"], gap["ci_high"]],
            "retain_fp": headline(m["unlearned_fp"]["retain"]), "retain_nf4": headline(m["unlearned_nf4"]["retain"]),
            "cad_nf4": (cad.get("after_nf4") or {}).get("value"), "cad_fp": (cad.get("after_fp") or {}).get("value"),
            **_cad_split(cad.get("after_nf4") or {}),
            "median_ratio": m.get("survival", {}).get("median_ratio"),
            "frac_code_changed": m.get("survival", {}).get("frac_code_changed"),
            "params_touched": m["unlearn"]["n_params_touched"], "wall_seconds": m["unlearn"]["wall_seconds"],
            "n_pass": card["n_pass"], "all_pass": card["all_pass"], "all_pass_cad_alone": _all_pass_cad_alone(card),
            "pass": {k: v["pass"] for k, v in card["properties"].items()}}


def _all_pass_cad_alone(card: dict) -> bool:
    """All four with structural erasure read as SPEC.md writes it, CAD above its threshold without the rule that
    attribution moved (mansu.scorecard): the paper's criterion, shown beside the stricter default."""
    props = card["properties"]
    return all(props[p]["pass"] for p in ("forgetting", "retain", "ptq_gap")) and \
        bool(props["structural_erasure"].get("cad_passes"))


def _cad_split(entry: dict) -> dict[str, float | None]:
    """CAD per fact with its CI's half-width, CAD's shrinkage and the share of attribution that moved
    (mansu.attribution.cad_parts), after NF4."""
    parts, fact = entry.get("parts") or {}, (entry.get("per_fact") or {}).get("cad") or {}
    half = (fact["ci_high"] - fact["ci_low"]) / 2 if fact else None
    return {"cad_fact_nf4": fact.get("value"), "cad_fact_half_width_nf4": half,
            **{f"cad_{p}_nf4": (parts.get(p) or {}).get("value") for p in ("shrinkage", "moved_beyond_noise")}}


def headline(scores: dict) -> float | None:
    """The split's score the scorecard reads: ROUGE-L recall on QA/text, accuracy on MCQ."""
    return scores.get("rouge_l_recall", scores.get("accuracy")) if scores else None


def metric_name(scores: dict) -> str:
    return f"{scores['rouge_kind']} ROUGE-L recall" if "rouge_l_recall" in scores else "accuracy"


def kept_sections(path: Path) -> str:
    """The sections of the table at `path` that compare does not generate (KEPT_SECTIONS, each up to the next '## '
    heading), to carry over when the table is rewritten; '' when there are none."""
    text = path.read_text() if path.is_file() else ""
    out = []
    for heading in KEPT_SECTIONS:
        start = text.find("\n" + heading + "\n")
        if start >= 0:
            end = text.find("\n## ", start + 1)
            out.append(text[start + 1: end if end >= 0 else len(text)].rstrip() + "\n")
    return "".join("\n" + section for section in out)


def _matrix_run(row: dict) -> MatrixRun:
    """The finished run of `row` as the matrix reads it: its stored metrics.json."""
    return MatrixRun(row["base"], row["method"], read_metrics(runs_root() / row["run_id"]))



COLUMNS = [("forget fp", "forget_fp", "{:.3f}"), ("forget NF4", "forget_nf4", "{:.3f}"),
           ("PTQ gap", "ptq_gap", "{:+.3f}"), ("retain fp", "retain_fp", "{:.3f}"), ("CAD (NF4)", "cad_nf4", "{:.3f}"),
           ("CAD per fact (NF4)", "cad_fact_nf4", "{:.3f}"), ("its 95% CI +-", "cad_fact_half_width_nf4", "{:.3f}"),
           ("CAD shrinkage part", "cad_shrinkage_nf4", "{:.3f}"), ("moved beyond noise", "cad_moved_beyond_noise_nf4",
                                                                   "{:.3f}"),
           ("median abs(delta)/bin", "median_ratio", "{:.3g}"), ("params touched", "params_touched", "{:.0f}"),
           ("wall s", "wall_seconds", "{:.1f}")]


def table(rows: list[dict], base: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows if r["base"] == base))
    head = "| method | " + " | ".join(c[0] for c in COLUMNS) + " | scorecard (seeds passing all 4) |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for method in methods:
        rs = [r for r in rows if r["base"] == base and r["method"] == method and "error" not in r]
        errs = [r for r in rows if r["base"] == base and r["method"] == method and "error" in r]
        cells = [mean_sd([r.get(key) for r in rs], fmt) for _, key, fmt in COLUMNS]
        passing = f"{sum(r['all_pass'] for r in rs)}/{len(rs) + len(errs)}"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {passing} |")
    return "\n".join(lines)


def per_property(rows: list[dict], base: str) -> str:
    props = ("forgetting", "retain", "ptq_gap", "structural_erasure")
    head = [*props, "all 4 with CAD alone as property 4 (SPEC.md's reading)"]
    lines = ["| method | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for method in dict.fromkeys(r["method"] for r in rows if r["base"] == base):
        rs = [r for r in rows if r["base"] == base and r["method"] == method and "error" not in r]
        counts = [sum(r["pass"][p] for r in rs) for p in props] + [sum(r.get("all_pass_cad_alone", False) for r in rs)]
        lines.append(f"| {method} | " + " | ".join(f"{c}/{len(rs)}" for c in counts) + " |")
    return "\n".join(lines)


def matrix_section(cells: Sequence[GapCell], base: str) -> list[str]:
    """The method x quantizer matrix of one base, with what it shows in words (both generated from `cells`)."""
    if not any(c.base == base for c in cells):
        return []
    return ["### Method x quantizer PTQ-gap matrix", "",
            "Forget PTQ gap per method and quantizer, acc(quantized) - acc(fp) (positive: the quantizer brings "
            "forgotten answers back), pooled over seeds, with a 95% bootstrap interval over forget questions "
            "(each question's paired differences from all seeds resampled together; generator seed fixed). "
            "Quantizers are simulated bit-exact (mansu.quant).", "", markdown_table(cells, base), "",
            summary(cells, base), ""]


def _metric_text(rows: list[dict]) -> str:
    """What the forget/retain columns hold: the demo's cloze MCQ accuracy, or the shape's metric of the data given."""
    metric = next((r["metric"] for r in rows if "metric" in r), "accuracy")
    return "cloze MCQ accuracy on the 120 forget questions" if metric == "accuracy" else \
        f"{metric} of the forget records (the scorecard's metric of the data's shape, docs/metrics.md; retain too)"


def _spread_text(rows: list[dict]) -> str:
    """What the spread over seeds covers: the demo models the runs used and the unlearning seeds."""
    models = sorted({r.get("model_seed", 0) for r in rows})
    if len(models) > 1:
        return (f"seed s unlearns with seed s on the demo model trained with seed s (models {_seeds(models)}: the "
                "same world and recipe, each its own init and data order), so the spread covers both the demo "
                "model's training seed and the unlearning seed.")
    return (f"every run is on demo model seed {models[0] if models else 0}, so the spread covers the unlearning "
            "seed only (batch order, retain sample), not the model.")


def _seeds(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def base_lines(rows: list[dict], caches: dict, base: str) -> list[str]:
    """The base accuracies of every demo model the runs of `base` used (forget/retain, fp and NF4)."""
    out = []
    for ms in sorted({r.get("model_seed", 0) for r in rows if r["base"] == base}):
        m = getattr(caches.get((base, ms)), "metrics", None) or {}
        acc = lambda k, s: _fmt(headline(m.get(k, {}).get(s, {})))  # noqa: E731
        out.append(f"Base model (demo model seed {ms}): forget fp {acc('base_fp', 'forget')}, NF4 "
                   f"{acc('base_nf4', 'forget')}; retain fp {acc('base_fp', 'retain')}, NF4 "
                   f"{acc('base_nf4', 'retain')}.")
    return [line + "  " for line in out[:-1]] + out[-1:]  # markdown line breaks between the models' lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def companion_line() -> str:
    """Links to the science pages the sweeps write beside this one (mansu.viz.science.SCIENCE_PAGES)."""
    from mansu.viz.science import SCIENCE_PAGES

    links = [f"[{name}]({name}) (`{command}`)" for name, command in SCIENCE_PAGES if name != "results.md"]
    return "Companion pages, each regenerated by its own command: " + "; ".join(links) + "."


def render(rows: list[dict], caches: dict, settings: dict, total: float, args, partial: str = "", *,
           cells: Sequence[GapCell] = ()) -> str:
    card = ScorecardConfig()
    parts = ["# Results on the demo world (generated by `python -m mansu compare`; do not edit by hand)", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {len(rows)} runs in "
             f"{total / 60:.1f} min on this machine; seeds 0..{args.seeds - 1}. Mean ± standard deviation over seeds; "
             f"{_spread_text(rows)}",
             *([f"**{partial}**", ""] if partial else []),
             "", companion_line(), "", f"Columns: {_metric_text(rows)} in full precision (fp) and after NF4 "
             "(simulated, bit-exact bitsandbytes dequantization, blocksize 64); PTQ gap = forget NF4 - forget fp "
             "(positive: NF4 brought forgotten answers back); retain accuracy on the first "
             f"{args.retain_eval_limit} retain questions; CAD of the forget circuit before vs after unlearning + NF4 "
             f"({args.attribution_records} forget records, {args.ig_steps} EAP-IG steps): pooled (SPEC's, over the "
             "records' mean graph) and per fact (each record's CAD, averaged; the scorecard's), with the half-width "
             "of the per-fact CAD's paired-bootstrap 95% CI; the share of its attribution that moved beyond the "
             "after graph's own noise (pooled, split-half corrected: moved_beyond_noise); median |delta| / NF4 bin "
             "width over updated Linear weights; Linear weights changed; unlearning wall time (s).", "",
             f"Scorecard thresholds (defaults; mansu/scorecard.py), each relative to chance and the base: at least "
             f"{card.forget_margin} of the base's above-chance forget accuracy removed, at most {card.retain_margin} "
             f"of its above-chance retain accuracy lost, PTQ gap's 95% CI high end <= {card.max_ptq_gap} of the "
             f"forget headroom, CAD per fact (NF4) CI low >= {card.cad_threshold} with attribution that moved "
             f"beyond its noise (moved_beyond_noise, CI low >= {card.reroute_threshold}); a base below chance + "
             f"{card.min_base_above_chance} of the room above it has nothing to forget.", ""]
    for base, title in (("nf4-grid", "NF4-grid-aligned base"), ("natural", "Natural fp32 base")):
        if not any(r["base"] == base for r in rows):
            continue
        parts += [f"## {title}", ""]
        if base == "nf4-grid":
            parts += ["Every non-head Linear weight was replaced by its NF4 round trip before unlearning (a checkpoint "
                      "distributed as dequantized NF4, a QLoRA merge, or QAT output). **These results depend on that "
                      "alignment**: on this base any update below half a bin rounds back to the base's code.", ""]
        else:
            parts += ["The demo model as trained (weights at random places inside their NF4 cells): NF4 dithers "
                      "sub-bin updates and keeps their mean (SPEC.md), so no PTQ recovery is expected here.", ""]
        parts += [*base_lines(rows, caches, base), "", table(rows, base), "",
                  "Seeds passing each property (the last column reads structural erasure as SPEC.md writes it, "
                  "CAD per fact above its threshold, without the default's rule that the attribution moved beyond "
                  "its noise: a suppression passes that reading too, docs/attribution.md):", "",
                  per_property(rows, base), "", *matrix_section(cells, base)]
    errors = [r for r in rows if "error" in r]
    if errors:
        parts += ["## Runs that failed", ""] + [f"- {r['method']} seed {r['seed']} (demo model seed "
                                               f"{r.get('model_seed', 0)}, {r['base']}): {r['error']}"
                                               for r in errors] + [""]
    parts += ["## Settings", "", "```json", json.dumps(settings, indent=1, sort_keys=True), "```", "",
              "Run ids: " + ", ".join(r["run_id"] for r in rows), ""]
    return "\n".join(parts)
