"""`python -m mansu eval`: MCQ accuracy of any model on any MCQ file, fp or NF4."""

from __future__ import annotations

import argparse
import json

from mansu.data.records import load_records, mcq_only
from mansu.metrics.accuracy import mcq_accuracy
from mansu.models.loading import load_model
from mansu.pipeline import resolve_model_path
from mansu.quant.twin import nf4_twin, paired_gap


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="MCQ accuracy of a model on a data file",
                              description="Score a causal LM on WMDP-format MCQ records (JSONL, CSV or Parquet) in the "
                                          "cloze or letter format, with a 95% bootstrap confidence interval; "
                                          "with --nf4, also its NF4 twin and the PTQ gap (NF4 - full precision, "
                                          "paired bootstrap CI).")
    p.add_argument("--model", required=True, help="local HF model folder or hub id ('demo' for the demo model)")
    p.add_argument("--data", required=True, nargs="+", help="one or more MCQ files (question, choices, answer)")
    p.add_argument("--format", default="cloze", choices=["cloze", "letter"], help="scoring format (default cloze)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights dtype (default fp32)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="cpu, cuda, or auto (accelerate device_map for models larger than one GPU)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (default 64)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code (off by default)")
    p.add_argument("--tokenizer", default=None, metavar="fast|PATH",
                   help="'fast': the model's tokenizer.json exactly as saved (AutoTokenizer may rebuild a saved "
                        "word-level tokenizer as the architecture's BPE); PATH: a tokenizer folder or tokenizer.json "
                        "(default: AutoTokenizer on the model folder)")
    p.add_argument("--nf4", choices=["simulated", "real"], default=None,
                   help="also score the NF4 twin: simulated (bit-exact round trip, fp32 compute) or real "
                        "(bitsandbytes Linear4bit via transformers); prints the PTQ gap")
    p.add_argument("--json", action="store_true", help="print one JSON line per file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    datasets = {path: mcq_only(load_records(path, "mcq"), path) for path in args.data}  # validate all first
    lm = load_model(resolve_model_path(args.model), dtype=args.dtype, device=args.device,
                    trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer)
    twin = None
    if args.nf4:

        twin = nf4_twin(lm.model, args.nf4)
        if not args.json:
            print(f"NF4 twin ({args.nf4}, blocksize {twin.blocksize}): {len(twin.quantized_modules)} modules quantized "
                  f"(the transformers default: every Linear layer except lm_head)")
    for path, records in datasets.items():
        r = mcq_accuracy(lm.model, lm.tokenizer, records, fmt=args.format, batch_size=args.batch_size, source=path)
        row = {"data": path, **{k: v for k, v in r.to_dict().items() if k != "correct"}}
        line = f"{path}: {args.format} accuracy {r.accuracy:.3f} (95% CI {r.ci_low:.3f}-{r.ci_high:.3f}, n={r.n})"
        if twin is not None:
            gap = _ptq_gap(twin, lm.tokenizer, records, r.correct, args)
            row["nf4"] = {"mode": args.nf4, "n_quantized_modules": len(twin.quantized_modules), **gap.to_dict()}
            line += (f"; NF4 {gap.acc_nf4:.3f}, PTQ gap {gap.gap:+.3f} "
                     f"(95% CI {gap.ci_low:+.3f} to {gap.ci_high:+.3f})")
        print(json.dumps(row) if args.json else line)
    return 0


def _ptq_gap(twin, tokenizer, records, correct_full, args):
    """acc(NF4 twin) - acc(model) on the same records, paired (mansu.quant.twin.paired_gap)."""
    quant = mcq_accuracy(twin.model, tokenizer, records, fmt=args.format, batch_size=args.batch_size, n_boot=10)
    return paired_gap(correct_full, quant.correct)
