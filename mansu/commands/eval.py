"""`python -m mansu eval`: the scores `run` records for a split, of any model on any MCQ, QA or text file, in full
precision and, with --nf4 / --quant, under any registered quantizer (simulated, bit-exact: mansu.quant.twin.quantized),
with the PTQ gap per quantizer.  MCQ: accuracy.  QA/text: token accuracy, exact match, loss and perplexity, and the
MUSE/TOFU memorisation metrics (mansu.metrics.text): verbatim (text) or knowledge (QA) ROUGE-L recall and, with
--holdout, the Min-K% membership AUC against the holdout records."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from mansu.choices import DEVICES, DTYPES
from mansu.data.records import load_records, shape_of
from mansu.data.templates import FORMAT_TEMPLATES, PRESETS, check_template
from mansu.metrics.scoring import check_renders, score_records
from mansu.metrics.text import ROUGE_PER_RECORD, text_metrics
from mansu.models.demo import ensure_demo
from mansu.models.loading import load_model
from mansu.pipeline import resolve_model_path
from mansu.quant.alignment import parse_quantizers
from mansu.quant.gptq import CALIBRATION_SAMPLES, calibration_texts, ensure_env, gptq_quantized
from mansu.quant.registry import CALIBRATED_QUANTIZERS, EVAL_QUANTIZERS, GPTQ
from mansu.quant.twin import nf4_twin, paired_gap, quantized


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score a model on MCQ, QA or text data",
                              description="Score a causal LM on MCQ records (accuracy under the template: cloze by "
                                          "default), QA records (answer token accuracy, exact match, loss) or text "
                                          "records (next-token accuracy, loss), with ROUGE-L memorisation and "
                                          "perplexity on QA and text (and the Min-K% membership AUC with "
                                          "--holdout), from JSONL, CSV or Parquet, with a "
                                          "95% bootstrap confidence interval; "
                                          "with --nf4, also its NF4 twin and the PTQ gap (NF4 - full precision, "
                                          "paired bootstrap CI); with --quant, the same under each listed quantizer "
                                          "(simulated, bit-exact).")
    p.add_argument("--model", required=True, help="local HF model folder or hub id ('demo' for the demo model)")
    p.add_argument("--data", required=True, nargs="+",
                   help="one or more data files, one shape each: MCQ (question, choices, answer), QA (question, "
                        "answer) or text (text)")
    p.add_argument("--format", default="cloze", choices=["cloze", "letter"],
                   help="MCQ scoring format (default cloze; letter is --template letter)")
    p.add_argument("--template", default=None,
                   help=f"prompt template of MCQ and QA records: {', '.join(PRESETS)}, wmdp:TOPIC or a custom string "
                        "containing {question} (default: the --format's, cloze-answer)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights dtype (default auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--device", default="cpu", choices=DEVICES,
                   help="cpu, cuda, or auto (accelerate device_map for models larger than one GPU)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (default 64)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own Python code (off by default)")
    p.add_argument("--tokenizer", default=None, metavar="fast|PATH",
                   help="'fast': the model's tokenizer.json exactly as saved (AutoTokenizer may rebuild a saved "
                        "word-level tokenizer as the architecture's BPE); PATH: a tokenizer folder or tokenizer.json "
                        "(default: AutoTokenizer on the model folder)")
    p.add_argument("--nf4", choices=["simulated", "real"], default=None,
                   help="also score the NF4 twin: simulated (bit-exact round trip, fp32 compute) or real "
                        "(bitsandbytes Linear4bit via transformers); prints the PTQ gap")
    p.add_argument("--quant", default=None, metavar="|".join(EVAL_QUANTIZERS),
                   help="also score the simulated twin (bit-exact round trip of every quantizable weight) under "
                        "each of these quantizers (comma-separated, e.g. nf4,int4-g128); prints each PTQ gap. "
                        f"{GPTQ}: llmcompressor GPTQ in mansu's side environment (created on first use), "
                        "calibrated on --calibration")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help=f"{GPTQ}'s calibration data: retain records (MCQ, QA or text; {CALIBRATION_SAMPLES} drawn "
                        "evenly); default with --model demo: the demo's retain split")
    p.add_argument("--holdout", default=None, metavar="FILE",
                   help="QA or text records never trained on, of the data files' shape: adds the Min-K%% membership "
                        "AUC of each QA/text file against them (MUSE's PrivLeak; 0.5 = indistinguishable)")
    p.add_argument("--json", action="store_true", help="print one JSON line per file")
    p.set_defaults(func=run)


@dataclass
class Scored:
    """One data file scored in full precision: its JSON row and printed line grow with each quantizer."""
    path: str
    records: list
    fp: dict[str, Any]   # score_records + text_metrics, per-record lists included (the paired gaps need them)
    row: dict[str, Any]
    parts: list[str]


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    quants = parse_quantizers(args.quant, calibrated=True) if args.quant is not None else []
    template = _template(args)
    datasets = {path: load_records(path) for path in args.data}  # validate all first
    for path, records in datasets.items():
        check_renders(records, template, source=path)
    holdout = _holdout(args, datasets)
    calibration = _calibration(args, quants)
    lm = load_model(resolve_model_path(args.model), dtype=args.dtype, device=args.device,
                    trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer)
    scored = []
    for path, records in datasets.items():
        fp = _scores(lm.model, lm.tokenizer, records, args, holdout, source=path)
        scored.append(Scored(path, records, fp, {"data": path, **_public(fp)}, [_summary(path, fp, args)]))
    if args.nf4:  # the model itself computes as its NF4 twin inside the block (no second copy)
        with nf4_twin(lm.model, args.nf4) as twin:
            if not args.json:
                print(f"NF4 twin ({args.nf4}, blocksize {twin.blocksize}): {len(twin.quantized_modules)} modules "
                      f"quantized (the transformers default: every Linear layer except lm_head)")
            for s in scored:
                entry, line = _quantized_entry(twin, lm.tokenizer, s, args, holdout)
                s.row["nf4"] = {"mode": args.nf4, "n_quantized_modules": len(twin.quantized_modules), **entry}
                s.parts.append(f"NF4 {line}")
    for quantizer in quants:  # one in-place rounding per quantizer, every file scored under it
        _score_quantizer(lm, quantizer, scored, args, calibration, holdout)
    for s in scored:
        print(json.dumps(s.row) if args.json else "; ".join(s.parts))
    return 0


def _scores(model, tokenizer, records: list, args: argparse.Namespace, holdout: list | None, *, n_boot: int = 1000,
            source: str | None = None) -> dict[str, Any]:
    """What `run` records for a split (mansu.pipeline._evaluate): accuracy, and on QA/text records ROUGE-L,
    perplexity and, with a holdout set, the Min-K% membership AUC (mansu.metrics.text)."""
    template = _template(args)
    r = score_records(model, tokenizer, records, template=template, batch_size=args.batch_size, n_boot=n_boot,
                      source=source)
    extra = text_metrics(model, tokenizer, records, loss=r.get("loss"), template=template, batch_size=args.batch_size,
                         holdout=holdout if r["shape"] != "mcq" else None, n_boot=n_boot)
    return {**r, **extra}


def _public(scores: dict[str, Any]) -> dict[str, Any]:
    """A split's scores without the per-record lists (the JSON row)."""
    return {k: v for k, v in scores.items() if k not in ("correct", ROUGE_PER_RECORD)}


def _quantized_entry(twin, tokenizer, s: Scored, args: argparse.Namespace,
                     holdout: list | None) -> tuple[dict[str, Any], str]:
    """The file's scores under the twin: the PTQ gap acc(q) - acc(fp) with a paired bootstrap CI (and on QA/text
    the gap of the ROUGE-L recall, the loss and the membership AUC), as a JSON entry and a line part."""
    q = _scores(twin.model, tokenizer, s.records, args, holdout, n_boot=10)
    gap = paired_gap(s.fp["correct"], q["correct"])
    entry = gap.to_dict()
    line = f"{gap.acc_nf4:.3f}, PTQ gap {gap.gap:+.3f} (95% CI {gap.ci_low:+.3f} to {gap.ci_high:+.3f})"
    if ROUGE_PER_RECORD in q:
        rouge = paired_gap(s.fp[ROUGE_PER_RECORD], q[ROUGE_PER_RECORD])
        entry.update(rouge_l=rouge.to_dict(), **{k: q[k] for k in ("loss", "perplexity", "mia") if k in q})
        line += (f", {q['rouge_kind']} ROUGE-L recall {rouge.acc_nf4:.3f} (gap {rouge.gap:+.3f}, 95% CI "
                 f"{rouge.ci_low:+.3f} to {rouge.ci_high:+.3f}), loss {q['loss']:.3f}" + _mia_part(q))
    return entry, line


def _mia_part(scores: dict[str, Any]) -> str:
    mia = scores.get("mia")
    return f", Min-K% AUC {mia['auc']:.3f} (PrivLeak {mia['privleak']:+.0f})" if mia else ""


def _holdout(args: argparse.Namespace, datasets: dict[str, list]) -> list | None:
    """--holdout's records, of the shape of every QA/text data file (the membership AUC is computed for each)."""
    if args.holdout is None:
        return None
    holdout = load_records(args.holdout)
    shapes = {path: shape_of(recs) for path, recs in datasets.items() if shape_of(recs) != "mcq"}
    if not shapes:
        raise ValueError(f"--holdout {args.holdout}: the membership AUC is computed for QA and text data, and every "
                         "--data file holds MCQ records (drop --holdout)")
    want = shape_of(holdout)
    for path, shape in shapes.items():
        if shape != want:
            raise ValueError(f"--holdout {args.holdout} holds {want} records but {path} holds {shape} records; give "
                             "holdout records of the data's shape (one eval call per shape)")
    return holdout


def _template(args: argparse.Namespace) -> str:
    """--template, or the template --format names (--format letter is the template 'letter')."""
    if args.template is None:
        return FORMAT_TEMPLATES[args.format]
    if args.format != "cloze":
        raise ValueError("give --format letter or --template, not both (--format letter is --template letter)")
    return check_template(args.template)


def _summary(path: str, r: dict, args: argparse.Namespace) -> str:
    """One file's line: MCQ accuracy; QA/text their token accuracy, exact match, loss, perplexity, ROUGE-L recall
    and the membership AUC when a holdout set was given."""
    name = (f"{args.format} accuracy" if args.template is None else f"{r['template']} accuracy") \
        if r["shape"] == "mcq" else r["metric"]
    line = f"{path}: {name} {r['accuracy']:.3f} (95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}, n={r['n']})"
    if r["shape"] != "mcq":
        line += (f", exact match {r['exact_match']:.3f}, loss {r['loss']:.3f} nats/token (perplexity "
                 f"{r['perplexity']:.4g}), {r['rouge_kind']} ROUGE-L recall {r['rouge_l_recall']:.3f} (95% CI "
                 f"{r['rouge_l_ci_low']:.3f}-{r['rouge_l_ci_high']:.3f}), F {r['rouge_l_f']:.3f}" + _mia_part(r))
    return line


def _calibration(args: argparse.Namespace, quants: list[str]) -> list[str]:
    """The calibration texts when a calibrated quantizer is asked for (and its environment, created now so that a
    failure is one line before the model loads); [] otherwise."""
    if not set(quants) & set(CALIBRATED_QUANTIZERS):
        return []
    if args.calibration is None and args.model != "demo":
        raise ValueError(f"--quant {GPTQ} calibrates on retain data: give --calibration FILE (MCQ, QA or text "
                         "records)")
    path = args.calibration or str(ensure_demo().retain_path)
    texts = calibration_texts(load_records(path))
    ensure_env()
    return texts


def _score_quantizer(lm, quantizer: str, scored: list[Scored], args: argparse.Namespace, calibration: list[str],
                     holdout: list | None) -> None:
    """Score every file under `quantizer` (the model's weights rounded in place, or GPTQ quantized, restored
    afterwards) and add its scores and PTQ gaps (`_quantized_entry`) to each file's row and line."""
    calibrated = quantizer in CALIBRATED_QUANTIZERS
    twin_of = gptq_quantized(lm.model, lm.tokenizer, calibration) if calibrated else quantized(lm.model, quantizer)
    with twin_of as twin:
        for s in scored:
            entry, line = _quantized_entry(twin, lm.tokenizer, s, args, holdout)
            s.row.setdefault("quant", {})[quantizer] = {"mode": twin.mode,
                                                       "n_quantized_modules": len(twin.quantized_modules),
                                                       "skipped_modules": twin.skipped_modules, **entry}
            s.parts.append(f"{quantizer} {line}")
