"""Print CAD's calibration cases on a demo model (mansu.attribution.cad_cases): per change, the forget accuracy and
CAD's parts pooled and per fact with their 95% CIs. The table in mansu/attribution/cad_parts.py's docstring.

    MANSU_HOME=... python scripts/cad_cases.py [--model-seed N] [--records 32] [--ig-steps 8]
"""

from __future__ import annotations

import argparse

import torch

from mansu.attribution.cad_cases import case_table
from mansu.attribution.circuit import smallest_faithful_circuit
from mansu.attribution.eap import attribute
from mansu.models.demo import ensure_demo, load_demo_split
from mansu.models.loading import load_model

PARTS = ("cad", "shrinkage", "reversal", "rerouting", "redistribution", "outside_shift", "moved_beyond_noise")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--records", type=int, default=32, help="forget records attributed (default 32)")
    p.add_argument("--ig-steps", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    assets = ensure_demo(model_seed=args.model_seed)
    lm = load_model(assets.model_dir)
    records = load_demo_split(assets, "forget")[:args.records]
    graph = attribute(lm.model, lm.tokenizer, records, ig_steps=args.ig_steps, batch_size=32, per_example=True)
    circuit = smallest_faithful_circuit(lm.model, lm.tokenizer, records, graph, target=0.8, batch_size=32)
    print(f"demo model seed {args.model_seed}, {len(records)} forget records, {args.ig_steps} IG steps, "
          f"circuit of {len(circuit.edges)} edges; value [95% CI]")
    print("| change | forget acc | estimator | " + " | ".join(PARTS) + " |")
    print("|---" * (len(PARTS) + 3) + "|")
    for row in case_table(lm.model, lm.tokenizer, records, graph, circuit, ig_steps=args.ig_steps):
        for estimator in ("pooled", "per_fact"):
            cells = [_cell(row[estimator].get(part)) for part in PARTS]   # moved_beyond_noise: pooled only
            print(f"| {row['case']} | {row['forget_accuracy']:.2f} | {estimator} | " + " | ".join(cells) + " |")


def _cell(part: dict | None) -> str:
    return "-" if part is None else f"{part['value']:.3f} [{part['ci_low']:.3f}, {part['ci_high']:.3f}]"


if __name__ == "__main__":
    main()
