"""GPU check (issue 10): a random-init Llama-3.1-8B-shaped model in bf16 on one CUDA device through the whole
pipeline (base eval, attribution, MANSU, fp and NF4 eval, attribution after, CAD, survival) on a handful of
records; prints the peak GPU memory and each stage's seconds as JSON lines.  Target: peak < 80 GB.

    .venv/bin/python bench/gpu_check.py [--layers 32] [--steps 3] [--method mansu] [--keep DIR]
    .venv/bin/python bench/gpu_check.py --config-only     # no GPU needed: the config, parameters, weight bytes

The model is built on the GPU (fast random init), saved once as bf16 safetensors (~16 GB of disk at 32 layers)
next to the tiny world's records and word-level tokenizer (mansu.testing.write_tiny_world), then run in this
process through `mansu run` so torch.cuda.max_memory_allocated covers every stage.  Without CUDA it refuses in
one line (exit 2) before building anything.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # long runs: less fragmentation
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 8192,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5}  # Llama-3.1-8B (rope scaling left out: short prompts)
GPU_LIMIT_GB = 80


def llama_config(layers: int, pad_token_id: int | None = None):
    import transformers as tf

    return tf.LlamaConfig(num_hidden_layers=layers, pad_token_id=pad_token_id, **LLAMA_8B)


def parameter_count(config) -> int:
    """Parameters of the model `config` describes, counted on the meta device (nothing allocated)."""
    import torch
    import transformers as tf

    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def build_world(root: Path, layers: int) -> dict[str, str]:
    """The tiny world's records and tokenizer with a random-init 8B-shaped Llama (bf16) as its model."""
    import torch
    import transformers as tf

    from mansu.testing import write_tiny_world

    world = write_tiny_world(root)
    tok = tf.AutoTokenizer.from_pretrained(world["model"])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no 32 GB fp32 copy at 8B
    try:
        with torch.device("cuda"):
            model = tf.LlamaForCausalLM(llama_config(layers, tok.pad_token_id)).eval()
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(world["model"], safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return world


def _read(run: Path | None, name: str) -> dict:
    path = run / name if run else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3.1-8B)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", default="mansu")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--keep", type=Path, default=None, help="build the model and runs here (kept) instead")
    parser.add_argument("--config-only", action="store_true", help="print the config's size and stop (no GPU)")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    import torch

    if not args.config_only and not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (torch.cuda.is_available() is False); "
              "use --config-only to check the config here", file=sys.stderr)
        return 2
    n_params = parameter_count(llama_config(args.layers))
    print(json.dumps({"check": "gpu", "layers": args.layers, "parameters": n_params,
                      "bf16_weights_gb": round(n_params * 2 / 1e9, 2)}), flush=True)
    if args.config_only:
        return 0
    from mansu.cli import main as mansu_main

    with tempfile.TemporaryDirectory(prefix="mansu-gpu-", dir=args.keep) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        world = build_world(root / "world", args.layers)
        build_s = time.perf_counter() - t0
        runs = root / "runs"
        os.environ["MANSU_RUNS"] = str(runs)
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        error = None
        try:
            code = mansu_main(["run", "--method", args.method, "--model", world["model"], "--forget", world["forget"],
                               "--retain", world["retain"], "--device", "cuda", "--dtype", "bf16",
                               "--steps", str(args.steps), "--batch-size", "4", "--k", str(args.k),
                               "--n-fisher", "4", "--attribution-records", "4", "--ig-steps", "4",
                               "--quantizers", "nf4", "--json"])
        except Exception as exc:  # an out-of-memory stage still reports the peak and the stages before it
            code, error = 1, f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        wall = time.perf_counter() - t0
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
        run = max((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, default=None)
        stages = _read(run, "stages.json").get("seconds", {})
        unlearn = _read(run, "metrics.json").get("unlearn", {})
    print(json.dumps({"bench": "gpu_check", "metric": "peak_gpu_memory_gb", "value": round(peak_gb, 2), "unit": "GB",
                      "reference": "80 GB GPU", "reference_value": GPU_LIMIT_GB,
                      "ratio": round(peak_gb / GPU_LIMIT_GB, 3), "target": f"< {GPU_LIMIT_GB}",
                      "meets_target": code == 0 and peak_gb < GPU_LIMIT_GB, "exit": code, "parameters": n_params,
                      "device": torch.cuda.get_device_name(0), "build_s": round(build_s, 1),
                      "pipeline_s": round(wall, 1), "stage_seconds": stages,
                      "engine_B_per_coord": unlearn.get("state_bytes_per_coordinate"),
                      "coordinates": unlearn.get("n_coordinates"), "error": error}))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
