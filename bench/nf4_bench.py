"""NF4 core benchmarks; each prints one JSON line with the reference measured in the same run.

1. nf4_quantize: mansu's quantize + per-element bin width (mansu.quant.geometry.quantize_with_bin_width) on a
   10M-element fp32 tensor vs bitsandbytes.functional.quantize_4bit(quant_type="nf4", blocksize=64) on the CPU
   (codes only), median wall time of --repeats interleaved runs.  Target: ratio = bnb / ours >= 1.0.
2. nf4_peak_memory: peak extra resident memory of each of the two calls, over the tensor's size (40 MB).  Method:
   each call runs in a fresh child process that builds the tensor, warms up on a small one, then resets the
   kernel's peak-RSS counter (write "5" to /proc/self/clear_refs) and reads VmHWM - VmRSS(before) from
   /proc/self/status after the call.  This sees every allocation, torch's included (tracemalloc sees none of
   torch's), and counts the outputs (ours: 10 MB codes + 40 MB bin widths).  Target: ours <= 3x the tensor.
3. nf4_survival_demo: survival_analysis over the demo model's quantizable weights for a dense update
   (1e-5 * N(0, 1) on every weight, an Adam-step-sized change), median of --repeats.  Target: <= 1 s.

Run:  .venv/bin/python bench/nf4_bench.py [--numel 10000000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def emit(bench: str, metric: str, value: float, unit: str, reference: str, reference_value: float, ratio: float,
         target: str, meets: bool) -> None:
    print(json.dumps({"bench": bench, "metric": metric, "value": value, "unit": unit, "reference": reference,
                      "reference_value": reference_value, "ratio": ratio, "target": target,
                      "meets_target": bool(meets)}), flush=True)


def _tensor(numel: int):
    import torch

    return torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 0.02


def _ours(x):
    from mansu.quant.geometry import quantize_with_bin_width

    return quantize_with_bin_width(x, 64)


def _bnb(x):
    import bitsandbytes.functional as F

    return F.quantize_4bit(x, blocksize=64, quant_type="nf4")


def bench_speed(numel: int, repeats: int) -> None:
    x = _tensor(numel)
    _ours(x), _bnb(x)  # warm-up
    ours, ref = [], []
    for _ in range(repeats):  # interleaved so both see the same machine load
        t0 = time.perf_counter()
        _ours(x)
        t1 = time.perf_counter()
        _bnb(x)
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        ref.append(t2 - t1)
    o, r = statistics.median(ours), statistics.median(ref)
    emit("nf4_quantize", f"quantize_plus_bin_width_{numel}_fp32", o, "s",
         "bitsandbytes.functional.quantize_4bit(nf4, blocksize 64, CPU)", r, r / o, "ratio >= 1.0", r / o >= 1.0)


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_child(which: str, numel: int) -> None:
    """Run in a fresh process: print the peak extra RSS (bytes) of one call."""
    x = _tensor(numel)
    fn = _ours if which == "ours" else _bnb
    fn(_tensor(1 << 16))  # load libraries, thread pools
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    out = fn(x)
    print((_status_kb("VmHWM") - before) * 1024)
    del out


def bench_memory(numel: int) -> None:
    def run(which: str) -> int:
        cmd = [sys.executable, __file__, "--peak-child", which, "--numel", str(numel)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return int(res.stdout.strip().splitlines()[-1])

    tensor_bytes = numel * 4
    o, r = run("ours") / tensor_bytes, run("bnb") / tensor_bytes
    emit("nf4_peak_memory", "peak_extra_rss_over_tensor_bytes", o, "x tensor size",
         "bitsandbytes.functional.quantize_4bit(nf4, blocksize 64, CPU)", r, r / o, "value <= 3.0", o <= 3.0)


def bench_survival(repeats: int) -> None:
    import torch

    from mansu.models.demo import ensure_demo
    from mansu.models.loading import load_model
    from mansu.quant.survival import survival_analysis
    from mansu.quant.targets import quantizable_parameter_names

    model = load_model(ensure_demo().model_dir).model
    names = quantizable_parameter_names(model)
    theta = {n: p.detach() for n, p in model.named_parameters() if n in names}
    gen = torch.Generator().manual_seed(0)
    new = {n: w + 1e-5 * torch.randn(w.shape, generator=gen) for n, w in theta.items()}
    survival_analysis(theta, new, names)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        survival_analysis(theta, new, names)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    n = sum(w.numel() for w in theta.values())
    emit("nf4_survival_demo", f"survival_analysis_demo_{n}_weights", t, "s", "time budget", 1.0, 1.0 / t,
         "value <= 1.0 s", t <= 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--peak-child", choices=("ours", "bnb"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-survival", action="store_true", help="skip the demo-model survival benchmark")
    args = parser.parse_args()
    if args.peak_child:
        peak_child(args.peak_child, args.numel)
        return
    bench_speed(args.numel, args.repeats)
    bench_memory(args.numel)
    if not args.skip_survival:
        bench_survival(max(3, args.repeats // 2))


if __name__ == "__main__":
    main()
