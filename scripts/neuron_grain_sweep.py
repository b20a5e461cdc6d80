"""The circuit's fraction of the quantizable weights at the neuron grain, per mass and cap, on a finished run's circuit.

Usage: python scripts/neuron_grain_sweep.py RUN_DIR [--masses 0.5,0.8,...] [--caps 0.25,1.0]
Reads the run's spec and circuit edges, rebuilds its (aligned) base and attribution prompts as the pipeline does,
scores the circuit MLPs' neurons once (mansu.attribution.neurons) and prints one JSON line per (mass, cap).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mansu.attribution.circuit import Circuit, circuit_parameter_masks
from mansu.attribution.neurons import keep_neurons, mlp_layers, neuron_scores, quantizable_fraction
from mansu.io import read_json
from mansu.pipeline import BaseCache, Context
from mansu.spec import RunSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--masses", default="0.5,0.6,0.7,0.8,0.9,0.95,1.0")
    parser.add_argument("--caps", default="0.1,0.25,1.0")
    args = parser.parse_args()
    spec = RunSpec.from_dict(read_json(args.run / "config.json")["spec"])
    circuit = Circuit([tuple(e) for e in read_json(args.run / "circuit.json")["edges"]])
    ctx = Context(Path(tempfile.mkdtemp()), spec, BaseCache())
    model, tok = ctx.base()
    prompts = ctx.prompts()
    layers = mlp_layers(circuit)
    scores = neuron_scores(model, tok, prompts.prompts, layers, metric=prompts.metric,
                           corruption=prompts.corruption, ig_steps=spec.ig_steps)
    whole = quantizable_fraction(model, circuit_parameter_masks(model, circuit))
    for cap in map(float, args.caps.split(",")):
        for mass in map(float, args.masses.split(",")):
            circuit.neurons = {} if mass >= 1 else {f"m{l}": keep_neurons(scores[l], mass, cap) for l in layers}
            print(json.dumps({"mass": mass, "cap": cap, "kept": {n: len(k) for n, k in circuit.neurons.items()},
                              "quantizable_fraction": round(quantizable_fraction(
                                  model, circuit_parameter_masks(model, circuit)), 4),
                              "whole_mlp": round(whole, 4), "nodes": circuit.nodes}))


if __name__ == "__main__":
    main()
