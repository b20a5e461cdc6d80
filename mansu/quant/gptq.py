"""Calibrated GPTQ as an evaluation quantizer, `gptq-int4-g128` (issue 11, item 2; docs/quantizers.md).

GPTQ (Frantar et al. 2023) rounds each Linear weight column by column and feeds each column's rounding error into
the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs on a calibration set: a code is
not the nearest level.  It runs here through llmcompressor 0.14.0.1 (`GPTQModifier(targets="Linear",
scheme="W4A16_ASYM", ignore=["lm_head"])`), which pins transformers <= 5.17 while mansu pins 5.24, so it runs in a
side environment that mansu manages:

    $MANSU_HOME/envs/gptq     python -m venv, then pip install torch==<mansu's own torch build> llmcompressor==0.14.0.1
                              (created on first use or by `mansu gptq-env`, ~2 min and 1.5 GB; the same torch build
                              as mansu's, e.g. 2.13.0+cpu, so pip never pulls a CUDA torch on a CPU machine)
    MANSU_GPTQ_PYTHON         an existing interpreter with llmcompressor installed, used as it is instead

The model is saved to a temporary folder, `gptq_worker.py` quantizes it in the side environment with calibration
texts drawn from the retain data (tokenized here, so both environments see the same ids), and the compressed-tensors
(pack-quantized) checkpoint is read back here without compressed-tensors: codes and zero points are 4-bit fields of
int32 words (element i of a word at bits 4i..4i+3, stored as q + 8), scales are the weight's dtype, and

    deq = (code - zero) * scale     per group of 128 along the input axis (mansu's Int4G128.dequantize).

llmcompressor takes the scales and zero points from the original weights before the column sweep, so they equal
mansu's int4-g128 of the same weights: GPTQ writes onto the int4-g128 grid and only the codes differ.  It is not a
round-to-nearest grid, so it has no bin widths or minimum moves: the floor and `diagnose` take grid quantizers
only (mansu.quant.registry.CALIBRATED_QUANTIZERS says which grid each calibrated quantizer writes onto).

Memory: the loaded checkpoint holds 1 B per weight (codes) plus 2-5 B per group; the twin saves a copy of each
replaced weight (its own bytes per weight) to restore it afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mansu.data.records import MCQRecord, QARecord, Record, TextRecord
from mansu.io import write_json_atomic
from mansu.paths import mansu_home
from mansu.quant.base import Quantized
from mansu.quant.registry import GPTQ, get_quantizer
from mansu.quant.targets import quantizable_modules
from mansu.quant.twin import QuantTwin

log = logging.getLogger(__name__)

LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
PYTHON_ENV_VAR = "MANSU_GPTQ_PYTHON"
MARKER = "mansu-gptq-env.json"  # written last: an environment without it is incomplete and rebuilt
WORKER = Path(__file__).with_name("gptq_worker.py")
CALIBRATION_SAMPLES = 128  # llmcompressor's examples use 512; 128 takes ~3 min on the demo model on 2 cores
GROUP_SIZE = 128
EXPECTED_WEIGHTS = {"num_bits": 4, "group_size": GROUP_SIZE, "symmetric": False, "type": "int", "strategy": "group"}


# ---------------------------------------------------------------- the side environment

def env_root() -> Path:
    return mansu_home() / "envs" / "gptq"


def env_pins() -> list[str]:
    """What the side environment installs: mansu's own torch build (a local version such as +cpu pins the build)."""
    return [f"torch=={torch.__version__}", LLMCOMPRESSOR]


def env_ready(root: Path) -> bool:
    marker = root / MARKER
    try:
        return json.loads(marker.read_text()).get("pins") == env_pins() and (root / "bin" / "python").is_file()
    except (OSError, ValueError):
        return False


def ensure_env(root: Path | None = None) -> Path:
    """The side environment's python: MANSU_GPTQ_PYTHON if set, else `root` (default $MANSU_HOME/envs/gptq),
    created first if missing or made for other pins.  FileNotFoundError with one line if it cannot be."""
    if os.environ.get(PYTHON_ENV_VAR):
        python = Path(os.environ[PYTHON_ENV_VAR])
        if not python.is_file():
            raise FileNotFoundError(f"{PYTHON_ENV_VAR}={python} is not a file; unset it to let mansu create "
                                    f"{env_root()}, or point it at a python with {LLMCOMPRESSOR} installed")
        return python
    root = Path(root or env_root())
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs asking at once: the second waits and finds it ready
        if not env_ready(root):
            _create_env(root)
    return root / "bin" / "python"


def _create_env(root: Path) -> None:
    log.warning("creating the GPTQ environment %s (%s; one time, ~2 min, ~1.5 GB)", root, " ".join(env_pins()))
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    steps = ([sys.executable, "-m", "venv", "--without-pip", str(root)],
             [sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install", "--quiet",
              *env_pins()])
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            shutil.rmtree(root, ignore_errors=True)
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise FileNotFoundError(f"could not create the GPTQ environment {root} ({cmd[2]} exited "
                                    f"{res.returncode}: {last}); it needs PyPI; retry with `mansu gptq-env`, or "
                                    f"set {PYTHON_ENV_VAR} to a python with {LLMCOMPRESSOR}")
    write_json_atomic(root / MARKER, {"pins": env_pins(), "seconds": round(time.perf_counter() - t0, 1)})
    log.warning("GPTQ environment ready in %.0f s", time.perf_counter() - t0)


# ---------------------------------------------------------------- calibration

def calibration_text(record: Record) -> str:
    """The text GPTQ calibrates on: an MCQ record as its cloze prompt with the correct answer (what the model is
    scored on), a QA record as question and answer, a text record as it is."""
    if isinstance(record, MCQRecord):
        return f"{record.question}\nAnswer: {record.choices[record.answer]}"
    if isinstance(record, QARecord):
        return f"{record.question}\n{record.answer}"
    if isinstance(record, TextRecord):
        return record.text
    raise ValueError(f"GPTQ calibration takes MCQ, QA or text records, got {type(record).__name__}")


def calibration_texts(records: Sequence[Record], n: int = CALIBRATION_SAMPLES) -> list[str]:
    """`n` texts spread evenly over `records` (files group records by entity)."""
    if not records:
        raise ValueError("GPTQ needs calibration records (the retain data); got none")
    return [calibration_text(r) for r in records[:: max(1, len(records) // n)][:n]]


def calibration_ids(tokenizer: Any, texts: Sequence[str], max_len: int | None) -> list[list[int]]:
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_len] for t in texts]
    return [x for x in ids if x]


# ---------------------------------------------------------------- running GPTQ

def run_gptq(model: Any, tokenizer: Any, texts: Sequence[str], out: Path, *, python: Path) -> float:
    """GPTQ-quantize `model` in the side environment into the checkpoint folder `out`; the GPTQ seconds."""
    from mansu.metrics.accuracy import context_length

    with tempfile.TemporaryDirectory(prefix="mansu-gptq-src-") as tmp:
        src = Path(tmp)
        model.save_pretrained(src, safe_serialization=True)
        tokenizer.save_pretrained(src)
        (src / "calibration.json").write_text(json.dumps(calibration_ids(tokenizer, texts, context_length(model))))
        res = subprocess.run([str(python), str(WORKER), str(src), str(src / "calibration.json"), str(out)],
                             capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"GPTQ failed in {python} (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["gptq_seconds"])


# ---------------------------------------------------------------- reading the checkpoint

def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, cols] in [0, 15] from int32 words [rows, ceil(cols / 8)] (element i at bits 4i..4i+3)."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed int4 weights must be a 2-d int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [rows, words, 8]; the mask undoes the sign extension
    return nibbles.reshape(packed.shape[0], -1)[:, :cols].to(torch.uint8)


def _check_config(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text()).get("quantization_config") or {}
    groups = list((config.get("config_groups") or {}).values())
    weights = groups[0].get("weights", {}) if len(groups) == 1 else {}
    if config.get("format") != "pack-quantized" or any(weights.get(k) != v for k, v in EXPECTED_WEIGHTS.items()):
        raise ValueError(f"{checkpoint}: not a pack-quantized int4 asymmetric group-128 compressed-tensors "
                         f"checkpoint (quantization_config {config or 'missing'})")


def load_gptq_checkpoint(checkpoint: Path) -> dict[str, Quantized]:
    """{module name: its int4-g128 Quantized (codes = q + 8, zeros = z + 8, uint8)} of a GPTQ checkpoint."""
    from safetensors.torch import load_file

    _check_config(checkpoint)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(path))
    out = {}
    for key in tensors:
        if not key.endswith(".weight_packed"):
            continue
        name = key.removesuffix(".weight_packed")
        rows, cols = (int(v) for v in tensors[f"{name}.weight_shape"].tolist())
        scales = tensors[f"{name}.weight_scale"]  # [rows, cols / 128]
        zeros = unpack_int4(tensors[f"{name}.weight_zero_point"].T.contiguous(), rows).T.contiguous()
        codes = unpack_int4(tensors[key], cols)
        out[name] = Quantized(codes, scales, zeros, (rows, cols), scales.dtype, GPTQ)
    return out


def dequantize(q: Quantized) -> torch.Tensor:
    return get_quantizer("int4-g128").dequantize(q)


# ---------------------------------------------------------------- the twin

@contextlib.contextmanager
def gptq_quantized(model: Any, tokenizer: Any, texts: Sequence[str], *,
                   python: Path | None = None) -> Iterator[QuantTwin]:
    """`model` itself with every Linear weight GPTQ quantized (calibrated on `texts`) for the duration of the block,
    restored bit-exactly afterwards (also on error).  Creates the side environment if needed."""
    python = python or ensure_env()
    with tempfile.TemporaryDirectory(prefix="mansu-gptq-") as tmp:
        seconds = run_gptq(model, tokenizer, texts, Path(tmp) / "gptq", python=python)
        checkpoint = load_gptq_checkpoint(Path(tmp) / "gptq")
    log.info("GPTQ on %d calibration texts: %.1f s, %d modules", len(texts), seconds, len(checkpoint))
    skipped = [n for n in quantizable_modules(model) if n not in checkpoint]
    with _replaced_weights(model, {name: dequantize(q) for name, q in checkpoint.items()}):
        yield QuantTwin(model=model.eval(), mode="calibrated", quantized_modules=list(checkpoint),
                        blocksize=GROUP_SIZE, quantizer=GPTQ, skipped_modules=skipped)


@contextlib.contextmanager
def _replaced_weights(model: Any, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Each named module's weight set to `weights[name]` for the block, the originals (a copy: their own bytes per
    weight, on their device) and the train/eval mode put back when it ends, also on error."""
    saved = {name: model.get_submodule(name).weight.detach().clone() for name in weights}
    was_training = model.training
    try:
        with torch.no_grad():
            for name, value in weights.items():
                weight = model.get_submodule(name).weight
                weight.copy_(value.to(weight.dtype).reshape(weight.shape))
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                model.get_submodule(name).weight.copy_(weight)
        model.train(was_training)
