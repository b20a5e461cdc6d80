"""A synthetic run folder in the documented artifact schemas, for app tests and benchmarks that must
not wait for the backend (the real-backend fixtures use `python -m mansu run`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mansu.io import write_json_atomic
from mansu.runs import layout
from mansu.runs.store import create_run, write_status
from mansu.scorecard import build_scorecard
from mansu.viz.circuit import synthetic_graph


def _graph_json(seed: int, scale: float = 1.0) -> dict:
    g = synthetic_graph(2, 8, seed=seed)
    return {"n_layers": 2,
            "nodes": [{"name": n, "layer": int(l), "score": float(s) * scale, "in_circuit": bool(c),
                       "params": [f"model.layers.{l}.mlp.down_proj.weight"] if n.startswith("m") else []}
                      for n, l, s, c in zip(g.names, g.layers, g.scores, g.in_circuit)],
            "links": [{"source": g.names[s], "target": g.names[d], "weight": float(w) * scale}
                      for s, d, w in zip(g.src, g.dst, g.weight)]}


EDGES = np.logspace(-4, 2, 61)  # mansu.quant.survival's histogram_edges()


def _hist(rng: np.random.Generator, centre: float) -> list[int]:
    """Counts [under, 60 log bins, over] as mansu.quant.survival stores them."""
    samples = np.exp(rng.normal(np.log(centre), 1.0, 5000))
    return np.bincount(np.searchsorted(EDGES, samples, side="right"), minlength=62).tolist()


def _acc(value: float) -> dict:
    return {"accuracy": value, "ci_low": max(0.0, value - 0.05), "ci_high": min(1.0, value + 0.05), "n": 200}


def write_sample_run(root: Path, method: str = "mansu", seed: int = 0, forget_after: float = 0.3) -> Path:
    """Create a finished run with every artifact the app draws; returns its folder."""
    rng = np.random.default_rng(seed)
    spec = {"model": "demo/model", "forget": "demo/forget.jsonl", "retain": "demo/retain.jsonl",
            "unlearn": {"method": method, "kappa": 1.0}, "base_alignment": "nf4-grid"}
    run = create_run({"kind": "unlearn", "method": method, "spec": spec}, f"sample-{method}", root)
    for stage, scale in (("before", 1.0), ("after_fp", 0.4), ("after_nf4", 0.45)):
        write_json_atomic(layout.attribution_json(run, stage), _graph_json(seed, scale))
    centre = 1.2 if method == "mansu" else 0.05
    write_json_atomic(run / layout.SURVIVAL, {
        "kind": "nf4_survival", "histogram_edges": EDGES.tolist(),
        "overall": {"median_ratio": centre, "frac_code_changed": 0.9 if method == "mansu" else 0.05,
                    "histogram": _hist(rng, centre)},
        "layers": {str(l): {"median_ratio": centre, "frac_code_changed": 0.5 + 0.1 * l,
                            "histogram": _hist(rng, centre)} for l in range(2)},
        "tensors": {f"model.layers.{l}.mlp.{k}.weight": {"median_ratio": centre, "frac_code_changed": 0.3 + 0.2 * l + 0.1 * i,
                                                         "histogram": _hist(rng, centre)}
                    for l in range(2) for i, k in enumerate(("up_proj", "down_proj"))}})
    metrics = {
        "base_fp": {"forget": _acc(1.0), "retain": _acc(1.0)}, "base_nf4": {"forget": _acc(1.0), "retain": _acc(0.99)},
        "unlearned_fp": {"forget": _acc(forget_after), "retain": _acc(0.97)},
        "unlearned_nf4": {"forget": _acc(forget_after + 0.02), "retain": _acc(0.94)},
        "ptq_gap": {"forget": {"gap": 0.02, "ci_low": -0.01, "ci_high": 0.05}}}
    write_json_atomic(run / layout.METRICS, metrics)
    cad = {f"after_{w}": {"value": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n_examples": 64,
                          "per_edge": {f"a0.h{i % 8}->m{i % 2}": 0.1 / (i + 1) for i in range(10)}}
           for w, v in (("fp", 0.6 if method == "mansu" else 0.1), ("nf4", 0.55 if method == "mansu" else 0.08))}
    write_json_atomic(run / layout.CAD, cad)
    write_json_atomic(run / layout.SCORECARD, build_scorecard(metrics, cad))
    write_sample_update(run / layout.UPDATE, rng)
    write_status(run, "done", 1, 1, state="finished")
    return run


def write_sample_update(path: Path, rng: np.random.Generator, n: int = 20_000) -> None:
    """update.safetensors in the floor-preview format (`<param>.<field>` arrays, `__epsilon__`)."""
    import torch

    from mansu.io import write_safetensors_atomic

    bins = rng.uniform(0.005, 0.02, n)
    proposal = rng.normal(0, 0.003, n)
    arrays = {"proposal": proposal, "priority": np.abs(proposal), "bin_width": bins,
              "move_up": rng.uniform(0, 1, n) * bins, "move_down": rng.uniform(0, 1, n) * bins,
              "cap_up": np.full(n, 1.0), "cap_down": np.full(n, 1.0), "fisher": rng.exponential(1.0, n)}
    tensors = {f"model.layers.0.mlp.down_proj.weight.{k}": torch.tensor(v, dtype=torch.float32) for k, v in arrays.items()}
    tensors["__epsilon__"] = torch.tensor([0.5])
    write_safetensors_atomic(path, tensors)
