"""Does a floored update survive GPTQ?  Issue 11, item 2: the floor's guarantee covers round-to-nearest grids only;
whether GPTQ's error-compensating rounding keeps a floored code change is measured here, on one finished run.

For the coordinates the run updated (update.safetensors, delta != 0) it compares the quantized code of the base and
of the unlearned model under: NF4 (bitsandbytes grid, mansu.quant), int4-g128 round-to-nearest (mansu's Int4G128),
and GPTQ (llmcompressor in mansu's side environment, mansu.quant.gptq, calibrated on the same retain texts for both
models).  Also: the fraction of weights outside the update whose GPTQ code changes (0 by construction under
round-to-nearest; GPTQ's error feedback carries a change along the row), the groups whose GPTQ scale or zero point
changed, and the run's forget/retain accuracy per quantizer from its metrics.json (a run made with
--quantizers nf4,int4-g128,gptq-int4-g128 has all three).  One JSON line per number (informational: no target).

Run:  MANSU_HOME=... MANSU_RUNS=... .venv/bin/python bench/gptq_floor.py RUN_DIR [--samples 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def emit(metric: str, value: float, **extra) -> None:
    print(json.dumps({"bench": "gptq_floor", "metric": metric, "value": value, "target": "informational",
                      "meets_target": True, **extra}), flush=True)


def updated_coordinates(run: Path) -> dict:
    """{parameter: flat indices} of the coordinates the run changed (update.safetensors delta != 0)."""
    from mansu.io import read_safetensors

    tensors = read_safetensors(run / "update.safetensors")
    return {key.removesuffix(".index"): idx[tensors[key.removesuffix(".index") + ".delta"] != 0]
            for key, idx in tensors.items() if key.endswith(".index")}


def codes_at(model, tokenizer, texts, coords, python) -> dict[str, dict]:
    """{quantizer: {parameter: codes at coords, or the whole GPTQ Quantized}} of one model."""
    from mansu.quant.gptq import load_gptq_checkpoint, run_gptq
    from mansu.quant.registry import get_quantizer

    out = {"nf4": {}, "int4-g128": {}}
    for name, idx in coords.items():
        w = model.get_parameter(name).detach()
        for q in out:
            out[q][name] = get_quantizer(q).quantize(w).codes.reshape(-1)[idx]
    with tempfile.TemporaryDirectory() as tmp:
        seconds = run_gptq(model, tokenizer, texts, Path(tmp) / "gptq", python=python)
        out["gptq"] = load_gptq_checkpoint(Path(tmp) / "gptq")
    emit("gptq_seconds", seconds)
    return out


def main() -> None:
    import torch

    from mansu.io import read_json
    from mansu.pipeline import BaseCache, Context
    from mansu.quant.gptq import calibration_texts, ensure_env
    from mansu.spec import RunSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()
    config = read_json(args.run / "config.json")
    ctx = Context(run=args.run, spec=RunSpec.from_dict(config["spec"]), cache=BaseCache())
    coords = updated_coordinates(args.run)
    python = ensure_env()
    base, tok = ctx.base()
    texts = calibration_texts(ctx.split("retain"), args.samples)
    before = codes_at(base, tok, texts, coords, python)
    after = codes_at(ctx.model_after(), tok, texts, coords, python)  # the base, now holding the run's update
    n = sum(int(i.numel()) for i in coords.values())
    emit("updated_coordinates", n, floor_quantizers=ctx.spec.unlearn.floor_quantizers)
    changed = {q: torch.cat([before[q][p] != after[q][p] for p in coords]) for q in ("nf4", "int4-g128")}
    changed["gptq"] = torch.cat([before["gptq"][p.removesuffix(".weight")].codes.reshape(-1)[i]
                                 != after["gptq"][p.removesuffix(".weight")].codes.reshape(-1)[i]
                                 for p, i in coords.items()])
    for q, c in changed.items():
        emit(f"fraction_of_updated_codes_changed_{q}", c.float().mean().item())
    emit("fraction_of_int4_rtn_changed_codes_gptq_also_changes",
         (changed["gptq"] & changed["int4-g128"]).sum().item() / max(1, int(changed["int4-g128"].sum())))
    outside = total = groups = moved_groups = 0
    for module, qa in after["gptq"].items():
        qb = before["gptq"][module]
        diff = qa.codes != qb.codes
        inside = coords.get(f"{module}.weight", torch.empty(0, dtype=torch.long))
        diff.reshape(-1)[inside] = False
        outside, total = outside + int(diff.sum()), total + diff.numel() - inside.numel()
        same = (qa.scales == qb.scales) & (qa.zeros == qb.zeros)
        groups, moved_groups = groups + same.numel(), moved_groups + int((~same).sum())
    emit("fraction_of_weights_outside_the_update_gptq_changes", outside / total)
    emit("fraction_of_groups_whose_gptq_scale_or_zero_changed", moved_groups / groups)
    metrics = read_json(args.run / "metrics.json")
    for stage in ("base", "unlearned"):
        evals = {"fp": metrics[f"{stage}_fp"], **metrics.get(f"{stage}_quant", {})}
        for q, ev in evals.items():
            for split in ("forget", "retain"):
                emit(f"{stage}_{split}_accuracy_{q}", ev[split]["accuracy"])


if __name__ == "__main__":
    main()
