"""Cold build of the demo (`python -m mansu demo` on an empty MANSU_HOME): wall time, CPU seconds, peak memory.

Each build runs in a fresh child process with its own empty MANSU_HOME and is timed from outside (wall clock;
user + system CPU seconds and peak RSS of that child from wait4). The reference, measured in the same run, is the
same build with AVX2 kernels only: ATEN_CPU_CAPABILITY=avx2 (torch's kernel dispatch), DNNL_MAX_CPU_ISA=AVX2
(oneDNN) and MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL), which emulates an AVX2-only CPU such as an AMD EPYC without
AVX-512 on an AVX-512 machine (within a factor: AMD's cores and caches differ). `--cpus 0,1` pins every build to
those CPUs (like `taskset -c 0,1`). Builds alternate (native, AVX2, native, ...) so load from other processes
hits both alike; with --repeats > 1 the medians are reported.

Target: every cold build <= 180 s, both ISAs, on 2 cores. The last line is the JSON record:
{"bench", "metric", "value", "unit", "cpu_s", "reference", "reference_value", "reference_cpu_s", "ratio", "target",
 "meets_target", "threads", "cpu", "accuracy_min", ...}; ratio = reference / value (the AVX2 slowdown).

Run:  .venv/bin/python bench/demo_bench.py [--repeats 1] [--cpus 0,1] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
TARGET_S = 180.0


def cpu_info() -> dict:
    """Model name and the SIMD flags that decide torch's kernels (from /proc/cpuinfo; empty elsewhere)."""
    flags, model = set(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name" and not model:
                model = value.strip()
    except OSError:
        pass
    return {"model": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags, "n_cpus": os.cpu_count()}


def cold_build(extra_env: dict[str, str], cpus: set[int] | None, threads: int | None) -> dict:
    """One cold `python -m mansu demo --json` in a child with an empty MANSU_HOME; its wall, CPU and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="mansu-demo-bench-") as home:
        env = {**os.environ, "MANSU_HOME": home, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra_env}
        cmd = [sys.executable, "-m", "mansu", "demo", "--json", *(["--threads", str(threads)] if threads else [])]
        log = Path(home) / "log.txt"
        with open(log, "w") as out:
            start = time.perf_counter()
            child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
            try:
                _, status, usage = os.wait4(child.pid, 0)
            except BaseException:           # interrupted: do not leave the build running
                child.kill()
                raise
            wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        text = log.read_text()
        if child.returncode != 0:
            raise RuntimeError(f"cold build failed ({child.returncode}):\n{text[-3000:]}")
        meta = json.loads((Path(home) / "demo" / "model" / "demo_meta.json").read_text())
        accuracies = json.loads(text.strip().splitlines()[-1])
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "train_s": meta["train_seconds"], "threads": meta["threads"],
            "cpu_capability": meta["cpu_capability"], "steps": meta["steps"],
            "accuracy_min": min(r["accuracy"] for r in accuracies.values()),
            "check_min_margin": min(meta["min_margin"].values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1, help="builds per ISA (medians reported)")
    ap.add_argument("--cpus", default=None, help="pin the builds to these CPUs, e.g. 0,1 (default: all allowed)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the demo's, every CPU)")
    args = ap.parse_args()
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
    runs: dict[str, list[dict]] = {"native": [], "avx2": []}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, env in (("native", {}), ("avx2", AVX2_ONLY)):
            runs[name].append(cold_build(env, cpus, args.threads))
            print(json.dumps({"build": name, **runs[name][-1]}), flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_rss_mb")}
           for name, rs in runs.items()}
    native, avx2 = med["native"], med["avx2"]
    print(json.dumps({
        "bench": "demo_bench", "metric": "cold_demo_build", "value": native["wall_s"], "unit": "s",
        "cpu_s": native["cpu_s"], "peak_rss_mb": native["peak_rss_mb"],
        "reference": "same build, AVX2 kernels only (" + " ".join(f"{k}={v}" for k, v in AVX2_ONLY.items()) + ")",
        "reference_value": avx2["wall_s"], "reference_cpu_s": avx2["cpu_s"],
        "ratio": round(avx2["wall_s"] / native["wall_s"], 2), "target": f"every cold build <= {TARGET_S:.0f} s",
        "meets_target": max(native["wall_s"], avx2["wall_s"]) <= TARGET_S,
        "threads": runs["native"][0]["threads"], "cpu_capability": runs["native"][0]["cpu_capability"],
        "reference_cpu_capability": runs["avx2"][0]["cpu_capability"], "cpus": sorted(cpus) if cpus else None,
        "cpu": cpu_info(), "repeats": args.repeats, "steps": runs["native"][0]["steps"],
        "accuracy_min": min(r["accuracy_min"] for rs in runs.values() for r in rs),
        "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
