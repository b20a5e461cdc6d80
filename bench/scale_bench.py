"""Benchmark: the whole pipeline on random-init Llamas of growing size (issue 10): peak RSS, the engine's bytes per
updated coordinate and the run folder's bytes per parameter, against the dense design's figures.

Each size is the Llama-3.2-1B layout (hidden 2048, MLP 8192, 32 heads, 8 KV heads, tied embeddings) with fewer
layers and the tiny world's word-level vocabulary and records (mansu.testing.write_tiny_world: 4 forget MCQ
records; 16 retain records from its names), random init, saved in bf16.  Per size, three commands run as child
processes (so each peak RSS is its own, from os.wait4): `mansu attribute`, `mansu run --method mansu` and
`mansu run --method graddiff`, all `--dtype bf16 --device cpu`, few steps.

    engine B/coord    measured: the run's metrics.json "unlearn".state_bytes_per_coordinate, i.e. the bytes of
                      every tensor the method holds after prepare() and after the last step (index, update,
                      Fisher, geometry, optimizer, retain projector; mansu.unlearn.engine.state_bytes) / the
                      coordinates it may update
    artifact B/param  the run folder's bytes on disk / the model's parameters
    reference         the dense design's formulas (issue 10, measured on the former engine): MANSU 53 + 4k B/coord
                      at rest, 53 + 15k at the QR construction's peak (~295 at k = 16); GradDiff 28 at rest, ~68
                      at the step's peak (flat fp32 gradients and Adam temporaries)

    MANSU_HOME=... .venv/bin/python bench/scale_bench.py [--sizes 1,2,5] [--k 16] [--steps 3]

--sizes lists layer counts (61M parameters per layer; 5 layers = 304M): the issue's three sizes are --sizes 1,2,5.
The default (1 layer, 61M) takes ~10 minutes on 2 busy cores (load 5-8: the MANSU run alone 6 min, 3 CPU-min);
each layer adds about as much again.  GradDiff runs --no-attribution (the attribute command and the MANSU run
measure attribution).  Prints one JSON line per size and stage, then the headline record.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
LAYOUT = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
          "tie_word_embeddings": True, "max_position_embeddings": 256, "rope_theta": 500000.0}  # Llama-3.2-1B
RETAIN_RECORDS = 16


def dense_reference(method: str, k: int) -> dict[str, float]:
    """The former engine's bytes per coordinate: index 8, total/proposal/priority 12, and for MANSU Fisher 4,
    update 4, touched 1, geometry 24 plus the fp32 basis 4k (construction peak ~15k); GradDiff Adam 8 (peak +40)."""
    if method == "mansu":
        return {"rest": 53 + 4 * k, "peak": 53 + 15 * k}
    return {"rest": 28, "peak": 68}


def build_world(root: Path, layers: int) -> tuple[dict[str, str], int]:
    """The tiny world's records and tokenizer with a random-init Llama of `layers` layers (bf16) in its place, and
    RETAIN_RECORDS retain records (its names and colours recombined), so MANSU keeps up to 16 retain gradients."""
    import torch
    import transformers as tf

    from mansu.testing import TINY_WORDS, write_tiny_world

    world = write_tiny_world(root)
    names, colors = TINY_WORDS.split()[2:10], ["red", "blue", "green", "amber"]
    rows = [{"question": f"Where is {names[i % 8]} from ?", "choices": colors, "answer": (i + i // 8) % 4,
             "subject": names[i % 8]} for i in range(RETAIN_RECORDS)]
    Path(world["retain"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tf.AutoTokenizer.from_pretrained(world["model"])
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tok), num_hidden_layers=layers, pad_token_id=tok.pad_token_id, **LAYOUT)
    model = tf.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(world["model"], safe_serialization=True)
    del model
    return world, n_params


def run_child(args: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """(exit code, peak RSS bytes, wall seconds, last stderr line) of `python -m mansu ARGS`."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "mansu", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - t0, lines[-1] if lines else ""


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def newest_run(runs: Path) -> Path | None:
    folders = [p for p in runs.iterdir() if p.is_dir()] if runs.exists() else []
    return max(folders, key=lambda p: p.stat().st_mtime) if folders else None


def bench_size(layers: int, args, tmp: Path) -> list[dict]:
    world, n_params = build_world(tmp / f"L{layers}", layers)
    runs = tmp / f"runs-L{layers}"
    env = {**os.environ, "MANSU_RUNS": str(runs), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["--model", world["model"], "--dtype", "bf16", "--device", "cpu", "--ig-steps", str(args.ig_steps)]
    out = []
    code, rss, wall, last = run_child(["attribute", *common, "--data", world["forget"], "--records", "4"], env)
    out.append({"stage": "attribute", "exit": code, "peak_rss_gb": round(rss / 2**30, 2), "wall_s": round(wall, 1),
                **({"error": last} if code else {})})
    for method in args.methods.split(","):
        extra = (["--k", str(args.k), "--n-fisher", "4", "--epsilon", "1e6"] if method == "mansu"
                 else ["--lr", "1e-4", "--no-attribution"])
        code, rss, wall, last = run_child(
            ["run", "--method", method, *common, "--forget", world["forget"], "--retain", world["retain"],
             "--attribution-records", "4", "--steps", str(args.steps), "--batch-size", "4", "--seed", "0",
             "--quantizers", "nf4", *extra], env)
        run = newest_run(runs)
        metrics = json.loads((run / "metrics.json").read_text()) if run and (run / "metrics.json").exists() else {}
        stages = json.loads((run / "stages.json").read_text()).get("seconds", {}) if run and (
            run / "stages.json").exists() else {}
        unlearn = metrics.get("unlearn", {})
        ref = dense_reference(method, min(args.k, RETAIN_RECORDS))  # MANSU keeps min(k, retain records) rows
        per_coord = unlearn.get("state_bytes_per_coordinate")
        out.append({"stage": f"run {method}", "exit": code, "peak_rss_gb": round(rss / 2**30, 2),
                    "wall_s": round(wall, 1), "coordinates": unlearn.get("n_coordinates"),
                    "engine_B_per_coord": per_coord, "dense_ref_B_per_coord_rest": ref["rest"],
                    "dense_ref_B_per_coord_peak": ref["peak"],
                    "ratio_vs_dense_rest": round(per_coord / ref["rest"], 3) if per_coord else None,
                    "artifact_B_per_param": round(folder_bytes(run) / n_params, 4) if run else None,
                    "stage_seconds": stages, **({"error": last} if code else {})})
    for row in out:
        row.update(bench="scale", layers=layers, parameters=n_params, k=args.k)
        print(json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1", help="layer counts of the Llama-3.2-1B layout (61M params each)")
    parser.add_argument("--k", type=int, default=16, help="MANSU's retain gradients")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", default="mansu,graddiff", help="the runs per size (comma-separated)")
    parser.add_argument("--ig-steps", type=int, default=2)
    args = parser.parse_args()
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        parser.error(f"--sizes must be comma-separated layer counts >= 1 (e.g. 1,2,5), got {args.sizes!r}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mansu-scale-") as tmp:
        for layers in sizes:
            rows += bench_size(layers, args, Path(tmp))
    largest = [r for r in rows if r["layers"] == sizes[-1]]
    by = {r["stage"]: r for r in largest}
    mansu, gd = by.get("run mansu", {}), by.get("run graddiff", {})
    k = min(args.k, RETAIN_RECORDS)
    peak = max(r["peak_rss_gb"] for r in largest)
    value = mansu.get("engine_B_per_coord")
    ok = (all(r["exit"] == 0 for r in rows) and value is not None and value <= 24
          and (gd.get("engine_B_per_coord") or 1e9) <= 16 and peak < 12)
    print(json.dumps({"bench": "scale", "metric": "mansu_engine_bytes_per_coordinate", "value": value,
                      "unit": "B/coord", "reference": f"dense design at k={k} (at rest)",
                      "reference_value": dense_reference("mansu", k)["rest"],
                      "ratio": round(value / dense_reference("mansu", k)["rest"], 3) if value else None,
                      "graddiff_B_per_coord": gd.get("engine_B_per_coord"),
                      "largest_parameters": largest[0]["parameters"],
                      "largest_peak_rss_gb": peak, "target": "MANSU <= 24, GradDiff <= 16 B/coord, peak < 12 GB",
                      "meets_target": ok}))


if __name__ == "__main__":
    main()
