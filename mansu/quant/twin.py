"""A model's NF4 twin, and the PTQ gap acc(NF4(model)) - acc(model) with a paired bootstrap CI.

Two modes:

* "simulated": a deep copy whose quantizable weights (mansu.quant.targets) are replaced by their NF4 round trip
  W -> dequantize(quantize(W)) (mansu.quant.nf4, bit-exact with bitsandbytes); compute stays in the model's
  dtype (fp32 for an fp32 model).  Conv1D weights (GPT-2) are quantized transposed, as bitsandbytes stores them
  (mansu.quant.targets.QuantLayout).
* "real": the model saved with save_pretrained and reloaded through transformers with
  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=float32) on the CPU:
  real bitsandbytes Linear4bit modules.  Their weights dequantize exactly to the simulated round trip, but
  bitsandbytes' CPU kernel computes single-row matmuls in bf16 on CPUs with avx512_bf16, so logits differ
  slightly (log-probabilities by ~1e-2) and an MCQ answer whose top two choices are that close may flip.

PTQ gap per split, on the same examples, paired:

    gap = mean_i (c_i^NF4 - c_i^full),   c = 1 if the example is answered correctly
    95% CI = percentile bootstrap of that mean, resampling examples (the same resample for both models).

A positive forget gap means NF4 brought forgotten answers back (the failure of Zhang et al., ICLR 2025).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mansu.metrics.accuracy import bootstrap_ci, mcq_accuracy
from mansu.quant.nf4 import DEFAULT_BLOCKSIZE, nf4_round_trip, validate_blocksize
from mansu.quant.targets import quant_layout, quantizable_modules

log = logging.getLogger(__name__)

TwinMode = Literal["simulated", "real"]
MODES = ("simulated", "real")


@dataclass
class NF4Twin:
    model: Any  # the quantized copy, eval mode; the original is untouched
    mode: str
    quantized_modules: list[str]  # module names whose weights are NF4
    blocksize: int


def nf4_twin(model: Any, mode: TwinMode = "simulated", *, blocksize: int = DEFAULT_BLOCKSIZE) -> NF4Twin:
    """The NF4 twin of `model` (a transformers causal LM) in `mode`; the original model is not modified."""
    if mode not in MODES:
        raise ValueError(f"unknown NF4 twin mode {mode!r}: accepted are {', '.join(MODES)}")
    validate_blocksize(blocksize, "nf4_twin")
    return _simulated_twin(model, blocksize) if mode == "simulated" else _real_twin(model, blocksize)


@torch.no_grad()
def _simulated_twin(model: Any, blocksize: int) -> NF4Twin:
    twin = copy.deepcopy(model).eval()
    modules = quantizable_modules(twin)
    layout = quant_layout(twin)
    for name in modules:
        weight, pname = twin.get_submodule(name).weight, f"{name}.weight"
        rt = layout.unview(pname, nf4_round_trip(layout.view(pname, weight.detach()), blocksize, name=pname))
        weight.copy_(rt)  # the twin's only parameter write: the copy, never the caller's model
    log.info("simulated NF4 twin: %d modules quantized (blocksize %d)", len(modules), blocksize)
    return NF4Twin(model=twin, mode="simulated", quantized_modules=list(modules), blocksize=blocksize)


def _real_twin(model: Any, blocksize: int) -> NF4Twin:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if blocksize != DEFAULT_BLOCKSIZE:
        raise ValueError(f"real NF4 loading uses bitsandbytes' blocksize 64 (transformers has no option), "
                         f"got {blocksize}; use mode='simulated' for other block sizes")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="mansu-nf4-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        twin = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=config, dtype=model.dtype,
                                                    device_map={"": "cpu"}, use_safetensors=True)
    twin.eval()
    modules = [n for n, m in twin.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    log.info("real bitsandbytes NF4 twin: %d Linear4bit modules", len(modules))
    return NF4Twin(model=twin, mode="real", quantized_modules=modules, blocksize=blocksize)


@dataclass(frozen=True)
class SplitGap:
    acc_full: float
    acc_nf4: float
    gap: float  # acc_nf4 - acc_full
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PTQGap:
    forget: SplitGap
    retain: SplitGap
    mode: str
    fmt: str
    quantized_modules: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"forget": self.forget.to_dict(), "retain": self.retain.to_dict(), "mode": self.mode,
                "fmt": self.fmt, "quantized_modules": list(self.quantized_modules)}


def paired_gap(correct_full: Sequence[bool], correct_nf4: Sequence[bool], *, n_boot: int = 1000,
               seed: int = 0) -> SplitGap:
    """Gap and paired percentile-bootstrap 95% CI from per-example correctness of the two models."""
    if len(correct_full) != len(correct_nf4) or not correct_full:
        raise ValueError("paired gap needs the same non-empty set of examples for both models")
    full = [float(c) for c in correct_full]
    nf4 = [float(c) for c in correct_nf4]
    diffs = [b - a for a, b in zip(full, nf4)]
    lo, hi = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
    n = len(full)
    return SplitGap(acc_full=sum(full) / n, acc_nf4=sum(nf4) / n, gap=sum(diffs) / n, ci_low=lo, ci_high=hi, n=n)


def ptq_gap(model: Any, tokenizer: Any, forget_records: Sequence[Any], retain_records: Sequence[Any],
            mode: TwinMode = "simulated", fmt: str = "cloze", *, blocksize: int = DEFAULT_BLOCKSIZE,
            batch_size: int = 64, n_boot: int = 1000, seed: int = 0) -> PTQGap:
    """acc(NF4(model)) - acc(model) on the forget and retain MCQ records, with paired bootstrap 95% CIs."""
    twin = nf4_twin(model, mode, blocksize=blocksize)
    gaps = {}
    for split, records in (("forget", forget_records), ("retain", retain_records)):
        full = mcq_accuracy(model, tokenizer, records, fmt=fmt, batch_size=batch_size, n_boot=10, seed=seed)
        quant = mcq_accuracy(twin.model, tokenizer, records, fmt=fmt, batch_size=batch_size, n_boot=10, seed=seed)
        gaps[split] = paired_gap(full.correct, quant.correct, n_boot=n_boot, seed=seed)
    return PTQGap(forget=gaps["forget"], retain=gaps["retain"], mode=mode, fmt=fmt,
                  quantized_modules=twin.quantized_modules)
