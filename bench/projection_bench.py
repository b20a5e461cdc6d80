"""Benchmark: the retain projection MANSU uses (mansu.unlearn.projection.FactoredRetainProjector: each Linear's
per-example inputs and output gradients, fp32, the k x k Gram matrix) against the dense QR projection of the
former engine (stack the k rows, orthonormal basis Q, g - Q Q^T g) and the intermediate Gram projector over k bf16
rows (RetainProjector), on the demo model's real per-example retain gradients over all its quantizable weights.

Each variant runs in its own child process, so its peak RSS is its own: `rows` only computes the k gradients and
drops them (the baseline every variant pays), `dense`, `gram` and `factored` build their projection and apply it
`--repeats` times to one forget gradient (`factored` builds through retain_statistics, which also keeps the
4 B/coordinate Fisher).  Reported: construction seconds, median seconds per projection, state bytes per
coordinate (the tensors kept), peak RSS over the baseline per coordinate (the construction's peak), and the
relative difference of the two projected vectors.

    MANSU_HOME=... .venv/bin/python bench/projection_bench.py [--k 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
VARIANTS = ("rows", "dense", "gram", "factored")


def child(variant: str, k: int, repeats: int, out: Path) -> None:
    import torch

    from mansu.models.demo import ensure_demo, load_demo_split
    from mansu.models.loading import load_model
    from mansu.unlearn.data import encode_records
    from mansu.unlearn.params import full_masks, index_from_masks
    from mansu.unlearn.projection import RetainProjector, orthonormal_basis, project_off
    from mansu.unlearn.retain_stats import per_example_grads, retain_statistics

    assets = ensure_demo()
    lm = load_model(assets.model_dir)
    retain = encode_records(lm.tokenizer, load_demo_split(assets, "retain"))
    forget = encode_records(lm.tokenizer, load_demo_split(assets, "forget")[:1])
    index = index_from_masks(full_masks(lm.model), lm.model)
    _, g = next(per_example_grads(lm.model, forget, index, 1))
    grads = per_example_grads(lm.model, retain, index, k, seed=0)
    t0 = time.perf_counter()
    if variant == "rows":
        for _ in grads:
            pass
        state, apply = 0, None
    elif variant == "dense":  # the former retain_statistics: stack, then QR
        basis = orthonormal_basis(torch.stack([row for _, row in grads]))
        state, apply = basis.numel() * 4, (lambda v: project_off(v, basis))
    elif variant == "factored":
        proj = retain_statistics(lm.model, retain, index, k=k, n_fisher=0).projector
        state, apply = proj.nbytes, proj.project
    else:
        proj = RetainProjector(index.numel, k)
        for _, row in grads:
            proj.add(row)
        proj.finish()
        state, apply = proj.nbytes, proj.project
    build = time.perf_counter() - t0
    times, p = [], None
    for _ in range(repeats if apply else 0):
        t = time.perf_counter()
        p = apply(g)
        times.append(time.perf_counter() - t)
    if p is not None:
        torch.save({"p": p, "g": g}, out.with_suffix(".pt"))
    out.write_text(json.dumps({"variant": variant, "n": index.numel, "build_s": round(build, 3),
                               "project_s": round(sorted(times)[len(times) // 2], 4) if times else None,
                               "state_bytes": state,
                               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.k, args.repeats, args.out)
        return
    import torch

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = Path(tmp) / f"{variant}.json"
            subprocess.run([sys.executable, __file__, "--child", variant, "--k", str(args.k),
                            "--repeats", str(args.repeats), "--out", str(out)], check=True)
            res[variant] = json.loads(out.read_text())
        loaded = {v: torch.load(Path(tmp) / f"{v}.pt", weights_only=True) for v in ("dense", "gram", "factored")}
    dense = loaded["dense"]
    removed = (dense["g"] - dense["p"]).double().norm()
    n, base = res["rows"]["n"], res["rows"]["peak_rss_bytes"]
    for v in ("dense", "gram", "factored"):
        r = res[v]
        r["state_B_per_coord"] = round(r["state_bytes"] / n, 2)
        r["peak_over_rows_B_per_coord"] = round((r["peak_rss_bytes"] - base) / n, 2)
        r["relative_difference_vs_dense"] = round(float((loaded[v]["p"].double() - dense["p"].double()).norm()
                                                        / removed), 6)
        print(json.dumps({"k": args.k, **r}))
    rel = res["factored"]["relative_difference_vs_dense"]
    ratio = res["factored"]["peak_over_rows_B_per_coord"] / max(res["dense"]["peak_over_rows_B_per_coord"], 1e-9)
    print(json.dumps({"bench": "retain_projection", "metric": "construction_peak_bytes_per_coordinate",
                      "value": res["factored"]["peak_over_rows_B_per_coord"], "unit": "B/coord",
                      "reference": "dense QR projection", "reference_value": res["dense"]["peak_over_rows_B_per_coord"],
                      "ratio": round(ratio, 3), "target": "<= 0.25 and relative difference <= 1e-2",
                      "relative_difference": round(rel, 5), "meets_target": ratio <= 0.25 and rel <= 1e-2}))


if __name__ == "__main__":
    main()
