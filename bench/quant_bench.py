"""Quantizer benchmarks: for every registered quantizer, mansu's quantize (codes + scales) of a 10M-weight fp32
tensor vs its reference library on the CPU, measured in the same run; one JSON line each (see bench/README.md).

References (the ones tests/test_quantizers.py checks bit-exactness against):
  nf4, fp4    bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type=...)
  int8        bitsandbytes.functional.int8_vectorwise_quant(w.to(float16)), what Int8Params does for load_in_8bit
              (the fp16 cast is timed: mansu does it inside quantize)
  int4-g128   compressed_tensors compute_dynamic_scales_and_zp + quantize (W4A16_ASYM, group 128)
Metric: median wall time of --repeats interleaved runs; target ratio = reference / mansu >= 1.0.  The tensor is
[numel // 4096, 4096] (a Linear weight: rows of 4096 inputs, 32 int4 groups a row), N(0, 0.02).

Run:  .venv/bin/python bench/quant_bench.py [--numel 10000000] [--repeats 7] [--only nf4,int8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
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
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import quantize
        from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp
        import torch

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


def main() -> None:
    from mansu.quant.registry import QUANTIZERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default=",".join(QUANTIZERS), help="comma-separated quantizer names")
    args = parser.parse_args()
    for name in args.only.split(","):
        bench_quantizer(name, args.numel, args.repeats)


if __name__ == "__main__":
    main()
