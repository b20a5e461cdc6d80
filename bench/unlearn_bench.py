"""Benchmark: MANSU's per-step wall time against GradDiff's on the demo model (target <= 1.5x), MANSU's one-time
preparation, peak memory, the retain basis' memory (k x circuit coordinates, not k x all parameters), and the
wall time of the last `python -m mansu compare` (read from its JSON in the runs folder, when there is one).

    MANSU_HOME=... .venv/bin/python bench/unlearn_bench.py [--steps 6]

Prints a few JSON lines, the last one the headline {"bench", "metric", "value", ...} record.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere


def step_seconds(model, forget, retain, config, masks=None) -> tuple[float, float, object]:
    from mansu.unlearn.engine import run_unlearning
    from mansu.unlearn.params import recording

    with recording(model) as restore:  # unlearn in place, then put the base back bit-exactly (no model copy)
        res = run_unlearning(model, forget, retain, config, masks=masks)
    restore.revert(model)
    per_step = sorted(s["step_seconds"] for s in res.steps)
    return per_step[len(per_step) // 2], res.summary["prepare_seconds"], res  # median step


def circuit_masks(lm, records):
    try:
        from mansu.attribution.circuit import circuit_parameter_masks, smallest_faithful_circuit
        from mansu.attribution.eap import attribute
    except ImportError:
        return None
    graph = attribute(lm.model, lm.tokenizer, records[:16], ig_steps=3, max_records=None)
    return circuit_parameter_masks(lm.model, smallest_faithful_circuit(lm.model, lm.tokenizer, records[:16], graph))


def last_compare_seconds() -> float | None:
    from mansu.paths import runs_root

    files = sorted(Path(runs_root()).glob("compare-*.json"))
    return json.loads(files[-1].read_text())["wall_seconds"] if files else None


def main() -> None:
    import torch

    from mansu.models.demo import ensure_demo, load_demo_split
    from mansu.models.loading import load_model
    from mansu.unlearn.config import UnlearnConfig
    from mansu.unlearn.data import encode_records

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--retain-weight", type=float, default=0.0, help="MANSU's mansu_retain_weight (compare: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 when the cores are shared)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = ensure_demo()
    lm = load_model(assets.model_dir)
    f_recs = load_demo_split(assets, "forget")
    forget = encode_records(lm.tokenizer, f_recs)
    retain = encode_records(lm.tokenizer, load_demo_split(assets, "retain"))
    masks = circuit_masks(lm, f_recs)
    common = {"steps": args.steps, "batch_size": 32, "k": 8, "n_fisher": 32}
    gd_step, _, _ = step_seconds(lm.model, forget, retain, UnlearnConfig(method="graddiff", lr=3e-5, **common))
    t0 = time.perf_counter()
    mansu_config = UnlearnConfig(method="mansu", mansu_retain_weight=args.retain_weight, **common)
    mansu_step, prep, res = step_seconds(lm.model, forget, retain, mansu_config, masks)
    n_all = sum(p.numel() for p in lm.model.parameters())
    k = common["k"]
    basis_mb = k * res.index.numel * 4 / 2**20
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"graddiff_step_s": gd_step, "mansu_step_s": mansu_step, "mansu_prepare_s": prep,
                      "circuit_coordinates": res.index.numel, "all_parameters": n_all,
                      "retain_basis_mb": round(basis_mb, 1), "basis_if_all_params_mb": round(k * n_all * 4 / 2**20, 1),
                      "peak_rss_mb": round(peak_mb, 1), "compare_wall_s": last_compare_seconds(),
                      "torch_threads": torch.get_num_threads(), "mansu_total_s": round(time.perf_counter() - t0, 1)}))
    ratio = mansu_step / gd_step
    print(json.dumps({"bench": "unlearn_step", "metric": "mansu_step_seconds", "value": round(mansu_step, 4),
                      "unit": "s",
                      "reference": "graddiff_step_seconds", "reference_value": round(gd_step, 4),
                      "ratio": round(ratio, 3), "target": "<= 1.5", "meets_target": ratio <= 1.5}))


if __name__ == "__main__":
    main()
