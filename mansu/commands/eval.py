"""`python -m mansu eval`: MCQ accuracy of any model on any MCQ file, in full precision and, with --quant, under any
registered quantizer (simulated, bit-exact: mansu.quant.twin.quantized), with the PTQ gap per quantizer."""

from __future__ import annotations

import argparse
import json

from mansu.choices import DEVICES, DTYPES
from mansu.data.records import load_records
from mansu.data.templates import FORMAT_TEMPLATES, PRESETS, check_template
from mansu.metrics.scoring import check_renders, score_records
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
                                          "records (next-token accuracy, loss), from JSONL, CSV or Parquet, with a "
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
    p.add_argument("--json", action="store_true", help="print one JSON line per file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    quants = parse_quantizers(args.quant, calibrated=True) if args.quant is not None else []
    template = _template(args)
    datasets = {path: load_records(path) for path in args.data}  # validate all first
    for path, records in datasets.items():
        check_renders(records, template, source=path)
    calibration = _calibration(args, quants)
    lm = load_model(resolve_model_path(args.model), dtype=args.dtype, device=args.device,
                    trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer)
    scored = []  # (row, line parts, records, per-example correctness in full precision)
    for path, records in datasets.items():
        r = score_records(lm.model, lm.tokenizer, records, template=template, batch_size=args.batch_size,
                          source=path)
        row = {"data": path, **{k: v for k, v in r.items() if k != "correct"}}
        parts = [_summary(path, r, args)]
        scored.append((row, parts, records, r["correct"]))
    if args.nf4:  # the model itself computes as its NF4 twin inside the block (no second copy)
        with nf4_twin(lm.model, args.nf4) as twin:
            if not args.json:
                print(f"NF4 twin ({args.nf4}, blocksize {twin.blocksize}): {len(twin.quantized_modules)} modules "
                      f"quantized (the transformers default: every Linear layer except lm_head)")
            for row, parts, records, correct in scored:
                gap = _ptq_gap(twin, lm.tokenizer, records, correct, args)
                row["nf4"] = {"mode": args.nf4, "n_quantized_modules": len(twin.quantized_modules), **gap.to_dict()}
                parts.append(f"NF4 {gap.acc_nf4:.3f}, PTQ gap {gap.gap:+.3f} "
                             f"(95% CI {gap.ci_low:+.3f} to {gap.ci_high:+.3f})")
    for quantizer in quants:  # one in-place rounding per quantizer, every file scored under it
        _score_quantizer(lm, quantizer, scored, args, calibration)
    for row, parts, _, _ in scored:
        print(json.dumps(row) if args.json else "; ".join(parts))
    return 0


def _ptq_gap(twin, tokenizer, records, correct_full, args):
    """acc(NF4 twin) - acc(model) on the same records, paired (mansu.quant.twin.paired_gap)."""
    quant = score_records(twin.model, tokenizer, records, template=_template(args), batch_size=args.batch_size,
                          n_boot=10)
    return paired_gap(correct_full, quant["correct"])


def _template(args: argparse.Namespace) -> str:
    """--template, or the template --format names (--format letter is the template 'letter')."""
    if args.template is None:
        return FORMAT_TEMPLATES[args.format]
    if args.format != "cloze":
        raise ValueError("give --format letter or --template, not both (--format letter is --template letter)")
    return check_template(args.template)


def _summary(path: str, r: dict, args: argparse.Namespace) -> str:
    """One file's line: MCQ accuracy as before; QA/text their token accuracy, exact match and loss."""
    name = (f"{args.format} accuracy" if args.template is None else f"{r['template']} accuracy") \
        if r["shape"] == "mcq" else r["metric"]
    line = f"{path}: {name} {r['accuracy']:.3f} (95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}, n={r['n']})"
    if r["shape"] != "mcq":
        line += f", exact match {r['exact_match']:.3f}, loss {r['loss']:.3f} nats/token"
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


def _score_quantizer(lm, quantizer: str, scored: list, args: argparse.Namespace, calibration: list[str]) -> None:
    """Score every file under `quantizer` (the model's weights rounded in place, or GPTQ quantized, restored
    afterwards) and add its PTQ gap, acc(q) - acc(fp) with a paired bootstrap CI, to each file's row and line."""
    calibrated = quantizer in CALIBRATED_QUANTIZERS
    twin_of = gptq_quantized(lm.model, lm.tokenizer, calibration) if calibrated else quantized(lm.model, quantizer)
    with twin_of as twin:
        for row, parts, records, correct in scored:
            gap = _ptq_gap(twin, lm.tokenizer, records, correct, args)
            row.setdefault("quant", {})[quantizer] = {"mode": twin.mode,
                                                     "n_quantized_modules": len(twin.quantized_modules),
                                                     "skipped_modules": twin.skipped_modules, **gap.to_dict()}
            parts.append(f"{quantizer} {gap.acc_nf4:.3f}, PTQ gap {gap.gap:+.3f} "
                         f"(95% CI {gap.ci_low:+.3f} to {gap.ci_high:+.3f})")
