"""Attribution benchmark: full-graph EAP-IG vs exact per-edge activation patching (the reference, same run).

    .venv/bin/python bench/attribution_bench.py [--records 32] [--ig-steps 8] [--skip-demo] [--layers 1,2,4,8]

1. demo model (built under MANSU_HOME if missing): EAP-IG time, exact patching time, Spearman of the two over
   every edge (informational line). Edges beyond --max-exact (default 300) are sampled, their time extrapolated.
2. random-init Llama, 8 layers x 8 heads, hidden 128: same measurement. Target: exact / EAP-IG >= 20 with
   Spearman >= 0.8 (the final JSON line).
3. scaling table: the same small Llama with 1, 2, 4, 8 layers: edges, forward(+backward) passes of each method
   per batch, and wall time. EAP-IG costs 2 forward passes + ig_steps forward+backward passes whatever the number
   of edges; exact patching costs 2 + one forward pass per edge, and the edges grow quadratically with depth.
Each measurement prints one JSON line {"bench","metric","value","unit","reference","reference_value","ratio",
"target","meets_target"}; the table goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def emit(metric: str, value: float, unit: str, reference: str, reference_value: float, ratio: float, target: str,
         meets: bool) -> None:
    print(json.dumps({"bench": "attribution", "metric": metric, "value": round(value, 4), "unit": unit,
                      "reference": reference, "reference_value": round(reference_value, 4), "ratio": round(ratio, 3),
                      "target": target, "meets_target": bool(meets)}), flush=True)


def measure(model, tokenizer, records, ig_steps: int, batch_size: int, max_exact: int) -> dict:
    """Wall time of EAP-IG and of exact patching on the same records, and their Spearman over the patched edges.

    With more than `max_exact` edges, exact patching runs on a uniform random sample of `max_exact` edges (seed 0)
    and its full-graph time is extrapolated as (measured time) x (edges / sampled edges): every edge costs one
    forward pass of the same shape, so the per-edge cost does not depend on which edges are sampled.
    """
    import random

    import torch

    from mansu.attribution.eap import attribute, exact_edge_effects
    from mansu.attribution.stats import spearman

    attribute(model, tokenizer, records, ig_steps=1, batch_size=batch_size)     # warm-up (allocator, kernels)
    times = []
    for _ in range(3):                        # median of 3: the shared CPU makes single timings noisy
        t0 = time.perf_counter()
        graph = attribute(model, tokenizer, records, ig_steps=ig_steps, batch_size=batch_size)
        times.append(time.perf_counter() - t0)
    t_eap = sorted(times)[1]
    edges = [(u, v) for u, v, _ in graph.edges()]
    sample = edges if len(edges) <= max_exact else random.Random(0).sample(edges, max_exact)
    t0 = time.perf_counter()
    exact = exact_edge_effects(model, tokenizer, records, batch_size=batch_size, edges=sample)
    t_exact = (time.perf_counter() - t0) * len(edges) / len(sample)
    idx = [graph.edge_index(u, v) for u, v in sample]
    ours = torch.tensor([float(graph.scores[i]) for i in idx])
    ref = torch.tensor([float(exact[i]) for i in idx])
    return {"eap_s": t_eap, "exact_s": t_exact, "edges": len(edges), "patched": len(sample),
            "spearman": spearman(ours, ref), "ratio": t_exact / t_eap}


def small_llama(layers: int, vocab: int):
    from mansu.testing import tiny_model

    return tiny_model("llama", vocab_size=vocab, layers=layers, hidden=128, heads=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--ig-steps", type=int, default=8)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--layers", default="1,2,4,8")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 avoids OpenMP oversubscription on a shared CPU (20x swings seen)")
    parser.add_argument("--max-exact", type=int, default=300,
                        help="edges patched exactly per model (rest extrapolated)")
    args = parser.parse_args()
    import torch

    from mansu.testing import toy_records, toy_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if not args.skip_demo:
        from mansu.models.demo import ensure_demo, load_demo_split
        from mansu.models.loading import load_model

        assets = ensure_demo()
        lm = load_model(assets.model_dir)
        demo = measure(lm.model, lm.tokenizer, load_demo_split(assets, "forget")[:args.records], args.ig_steps,
                       args.records, args.max_exact)
        emit("eap_ig_time_demo", demo["eap_s"], "s", "exact per-edge patching (demo model)", demo["exact_s"],
             demo["ratio"], f"spearman >= 0.8 (got {demo['spearman']:.3f})", demo["spearman"] >= 0.8)

    tok, recs = toy_tokenizer(), toy_records(args.records)
    rows = []
    for layers in sorted(int(x) for x in args.layers.split(",")):
        row = measure(small_llama(layers, len(tok)), tok, recs, args.ig_steps, args.records, args.max_exact)
        row.update(layers=layers, eap_passes=f"2 fwd + {args.ig_steps} fwd+bwd", exact_passes=f"2 + {row['edges']} fwd"
                   + (f", {row['patched']} timed" if row["patched"] < row["edges"] else ""))
        rows.append(row)
        print(f"layers={layers:2d} edges={row['edges']:5d}  EAP-IG {row['eap_s']:7.2f}s ({row['eap_passes']})  "
              f"exact {row['exact_s']:8.2f}s ({row['exact_passes']})  ratio {row['ratio']:6.1f}x  "
              f"spearman {row['spearman']:.3f}", file=sys.stderr, flush=True)
    big = next((r for r in rows if r["layers"] == 8), rows[-1])
    emit(f"eap_ig_time_llama_{big['layers']}x8", big["eap_s"], "s", "exact per-edge patching (same model, records)",
         big["exact_s"], big["ratio"], ">= 20x faster with spearman >= 0.8",
         big["ratio"] >= 20 and big["spearman"] >= 0.8)


if __name__ == "__main__":
    main()
