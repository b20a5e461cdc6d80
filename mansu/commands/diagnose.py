"""`python -m mansu diagnose`: how close a model's weights sit to each quantizer's grid, and whether sub-bin
forgetting on it is expected to be undone or kept by that quantizer (mansu.quant.diagnose has the rule)."""

from __future__ import annotations

import argparse
import json

from mansu.choices import DEVICES, DTYPES
from mansu.models.loading import check_finite_weights, load_config, require_causal_lm, torch_dtype
from mansu.pipeline import resolve_model_path
from mansu.quant.alignment import DEFAULT_QUANTIZERS, parse_alignment, parse_quantizers
from mansu.quant.diagnose import RATIO, diagnose_model
from mansu.unlearn.nf4_model import align_base


def register(subparsers) -> None:
    p = subparsers.add_parser("diagnose", help="grid alignment of a model's weights, per layer and quantizer",
                              description="Per weight and per quantizer: the mean distance of the weights to the "
                                          "nearest level (in bin widths: 0 on the grid, ~0.25 uniform), the fraction "
                                          "on the grid, the kept fraction k of a coherent update of --ratio bin "
                                          "widths, the fan-in and the predicted signal-to-noise sqrt(fan_in k r); "
                                          "then a verdict per quantizer: sub-bin forgetting is expected to be undone "
                                          "(k < 0.5) or kept in expectation (docs/quantizers.md).")
    p.add_argument("--model", required=True, help="local HF model folder or hub id ('demo' for the demo model)")
    p.add_argument("--base-alignment", default="natural",
                   help="diagnose the model after this alignment, as a run would use it (natural, nf4-grid, "
                        "<quantizer>, <quantizer>:<fraction>; default natural: the weights as saved)")
    p.add_argument("--quant", default=DEFAULT_QUANTIZERS, help=f"quantizers (comma-separated; default "
                                                               f"{DEFAULT_QUANTIZERS})")
    p.add_argument("--ratio", type=float, default=RATIO,
                   help=f"the sub-bin update r in bin widths the verdict is for, in (0, 0.5] (default {RATIO})")
    p.add_argument("--per-layer", action="store_true", help="also print one line per weight and quantizer")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights dtype (default auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="cpu, cuda or auto (accelerate device_map)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    p.add_argument("--json", action="store_true", help="print the whole report as one JSON object")
    p.set_defaults(func=run)


def load_weights_only(name: str, dtype: str, device: str, trust_remote_code: bool):
    """The causal LM at `name` (safetensors only, finite), without a tokenizer: the diagnostic needs none."""
    from transformers import AutoModelForCausalLM

    require_causal_lm(load_config(name, trust_remote_code=trust_remote_code), name)
    placement = {"device_map": "auto"} if device == "auto" else {"device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype(dtype, device),
                                                     use_safetensors=True, trust_remote_code=trust_remote_code,
                                                     **placement)
    except OSError as exc:
        raise ValueError(f"{name}: cannot load weights ({str(exc).splitlines()[0]}); mansu loads safetensors "
                         "weights only") from None
    check_finite_weights(model, name)
    return model.eval()


def run(args: argparse.Namespace) -> int:
    quants = parse_quantizers(args.quant)
    parse_alignment(args.base_alignment)  # before the weights load
    if not 0 < args.ratio <= 0.5:
        raise ValueError(f"--ratio must be in (0, 0.5] bin widths (a sub-bin update), got {args.ratio}")
    model = load_weights_only(resolve_model_path(args.model), args.dtype, args.device, args.trust_remote_code)
    align_base(model, args.base_alignment)
    report = {"model": args.model, "base_alignment": args.base_alignment,
              **diagnose_model(model, quants, ratio=args.ratio)}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.model} ({args.base_alignment} base): grid alignment, r = {args.ratio:g} bin widths")
    for q, entry in report["quantizers"].items():
        print(entry["overall"]["sentence"])
        if entry["skipped"]:
            print(f"  ({len(entry['skipped'])} weight(s) {q} cannot quantize left out)")
        for row in entry["layers"] if args.per_layer else ():
            print(f"  {q:<10} {row['name']:<48} fan-in {row['fan_in']:>6}  distance {row['mean_distance']:.3f}  "
                  f"on grid {row['frac_on_grid']:.3f}  k {row['kept_fraction']:.3f}  snr {row['snr']:.2f}")
    return 0
