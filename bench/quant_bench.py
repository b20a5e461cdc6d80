"""Quantizer benchmarks: for every registered quantizer, mansu's quantize (codes + scales) of a 10M-weight fp32
tensor vs its reference library on the CPU, measured in the same run; one JSON line each (see bench/README.md).

References (the ones tests/test_quantizers.py checks bit-exactness against):
  nf4, fp4    bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type=...)
  int8        bitsandbytes.functional.int8_vectorwise_quant(w.to(float16)), what Int8Params does for load_in_8bit
              (the fp16 cast is timed: mansu does it inside quantize)
  int4-g128   compressed_tensors compute_dynamic_scales_and_zp + quantize (W4A16_ASYM, group 128)
Metric: median wall time of --repeats interleaved runs; target ratio = reference / mansu >= 1.0.  The tensor is
[numel // 4096, 4096] (a Linear weight: rows of 4096 inputs, 32 int4 groups a row), N(0, 0.02).

Optional, item 2 of issue 11 (calibrated GPTQ): --gptq-python PATH runs llmcompressor's GPTQ (W4A16_ASYM, group
128, lm_head kept) on the demo model in that interpreter, which must have llmcompressor installed (it pins
transformers <= 5.17, so it lives in its own environment; see docs/quantizers.md), then loads the checkpoint here
and prints: the GPTQ wall time (target: minutes, <= 600 s), the fraction of groups whose scale and zero point are
identical to mansu's int4-g128 of the same weights (target 1.0: GPTQ writes onto the same grid), and the fraction
of codes GPTQ leaves where round-to-nearest puts them (informational).

Run:  .venv/bin/python bench/quant_bench.py [--numel 10000000] [--repeats 7] [--only nf4,int8]
      [--gptq-python /path/to/gptq-venv/bin/python --gptq-samples 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COLS = 4096


def emit(bench: str, metric: str, value: float, unit: str, reference: str, reference_value: float, ratio: float,
         target: str, meets: bool) -> None:
    print(json.dumps({"bench": bench, "metric": metric, "value": value, "unit": unit, "reference": reference,
                      "reference_value": reference_value, "ratio": ratio, "target": target,
                      "meets_target": bool(meets)}), flush=True)


def reference(name: str) -> tuple[str, Callable]:
    """(label, fn(w)) of the library call each quantizer is compared with."""
    if name in ("nf4", "fp4"):
        import bitsandbytes.functional as F

        return (f"bitsandbytes.functional.quantize_4bit({name}, blocksize 64, CPU)",
                lambda w: F.quantize_4bit(w, blocksize=64, quant_type=name))
    if name == "int8":
        import bitsandbytes.functional as F
        import torch

        return ("bitsandbytes.functional.int8_vectorwise_quant(fp16(w)) (Int8Params, CPU)",
                lambda w: F.int8_vectorwise_quant(w.to(torch.float16)))
    if name == "int4-g128":
        import torch
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import quantize
        from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

        args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128)

        def ct(w):
            scale, zero = compute_dynamic_scales_and_zp(w, args, module=None)
            return quantize(w, scale, zero, args, dtype=torch.int8), scale, zero

        return "compressed_tensors W4A16_ASYM qparams + quantize (CPU)", ct
    raise ValueError(f"no reference for {name!r}")


def bench_quantizer(name: str, numel: int, repeats: int) -> None:
    import torch

    from mansu.quant.registry import get_quantizer

    w = torch.randn(max(1, numel // COLS), COLS, generator=torch.Generator().manual_seed(0)) * 0.02
    ours = get_quantizer(name).quantize
    label, ref = reference(name)
    ours(w), ref(w)  # warm-up
    t_ours, t_ref = [], []
    for _ in range(repeats):  # interleaved so both see the same machine load
        t0 = time.perf_counter()
        ours(w)
        t1 = time.perf_counter()
        ref(w)
        t2 = time.perf_counter()
        t_ours.append(t1 - t0)
        t_ref.append(t2 - t1)
    o, r = statistics.median(t_ours), statistics.median(t_ref)
    emit(f"{name}_quantize", f"quantize_{w.numel()}_fp32", o, "s", label, r, r / o, "ratio >= 1.0", r / o >= 1.0)


GPTQ_SCRIPT = """
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

src, corpus, out, n_cal = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(src)
texts = [json.loads(line)["text"] for line in open(corpus).read().splitlines()][:n_cal]
ds = Dataset.from_list([dict(tok(t)) for t in texts])
t0 = time.time()
oneshot(model=model, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"]),
        num_calibration_samples=len(texts), max_seq_length=64)
print(json.dumps({"gptq_seconds": time.time() - t0}))
model.save_pretrained(out, save_compressed=True)
"""


def compare_gptq(checkpoint: Path, model_dir: Path) -> tuple[float, float, float]:
    """(groups with mansu's scale, ... zero point, codes equal to round-to-nearest), fractions, over the Linear
    weights of the compressed-tensors (pack-quantized) checkpoint."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    from mansu.models.loading import load_model
    from mansu.quant.registry import get_quantizer

    sd = load_file(checkpoint / "model.safetensors")
    qz = get_quantizer("int4-g128")
    same_s = same_z = same_c = groups = weights = 0
    for name, p in load_model(model_dir).model.named_parameters():
        pre = name.removesuffix(".weight")
        if pre + ".weight_packed" not in sd:
            continue
        shape = torch.Size(sd[pre + ".weight_shape"].tolist())
        codes = unpack_from_int32(sd[pre + ".weight_packed"], 4, shape)  # signed, in [-8, 7]
        scale = sd[pre + ".weight_scale"]
        zero = unpack_from_int32(sd[pre + ".weight_zero_point"], 4, scale.shape, packed_dim=0)
        mine = qz.quantize(p.detach())
        same_s += int((mine.scales == scale).sum())
        same_z += int((mine.zeros.long() - 8 == zero.long()).sum())
        same_c += int((mine.codes.long() - 8 == codes.long()).sum())
        groups, weights = groups + scale.numel(), weights + codes.numel()
    return same_s / groups, same_z / groups, same_c / weights


def bench_gptq(python: str, samples: int) -> None:
    from mansu.models.demo import demo_assets

    demo = demo_assets()  # an existing demo: building one here would take minutes and is not what is measured
    if not (demo.model_dir / "model.safetensors").is_file() or not demo.corpus_path.is_file():
        raise SystemExit(f"no demo model under {demo.root}: build it first (mansu demo), or set MANSU_HOME")
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "gptq.py", Path(tmp) / "gptq"
        script.write_text(GPTQ_SCRIPT)
        t0 = time.perf_counter()
        res = subprocess.run([python, str(script), str(demo.model_dir), str(demo.corpus_path), str(out),
                              str(samples)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode:
            raise SystemExit(f"GPTQ failed in {python}:\n{res.stderr[-3000:]}")
        scales, zeros, codes = compare_gptq(out, demo.model_dir)
    ref = "llmcompressor GPTQModifier(W4A16_ASYM) in --gptq-python, CPU"
    emit("gptq_demo", f"gptq_wall_seconds_{samples}_samples", wall, "s", "time budget", 600.0, 600.0 / wall,
         "value <= 600 s", wall <= 600)
    emit("gptq_grid", "fraction_of_groups_with_mansu_int4_g128_scale_and_zero", min(scales, zeros), "fraction",
         ref, 1.0, min(scales, zeros), "value == 1.0", min(scales, zeros) == 1.0)
    emit("gptq_codes", "fraction_of_codes_equal_to_round_to_nearest", codes, "fraction", ref, 1.0, codes,
         "informational", True)


def main() -> None:
    from mansu.quant.registry import QUANTIZERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default=",".join(QUANTIZERS), help="comma-separated quantizer names")
    parser.add_argument("--gptq-python", help="a Python with llmcompressor installed: also run GPTQ on the demo")
    parser.add_argument("--gptq-samples", type=int, default=128, help="GPTQ calibration texts from the demo corpus")
    args = parser.parse_args()
    for name in filter(None, args.only.split(",")):
        bench_quantizer(name, args.numel, args.repeats)
    if args.gptq_python:
        bench_gptq(args.gptq_python, args.gptq_samples)


if __name__ == "__main__":
    main()
