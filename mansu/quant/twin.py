"""A model's quantized twins (NF4 and any registered quantizer), and the PTQ gap acc(Q(model)) - acc(model) with a
paired bootstrap CI.

Any quantizer q of mansu.quant.registry, simulated: every quantizable weight W replaced by its round trip
RT_q(W) = q.dequantize(q.quantize(W)) in q's view (bit-exact with q's library; Conv1D weights transposed), compute
in the model's dtype.  Two ways to get it:

* `quant_twin(model, q)`: a deep copy (the original untouched), the twin object callers keep;
* `quantized(model, q)`: a context manager that rounds the caller's model in place and restores it bit-exactly in
  `finally`; it holds a copy of the quantizable weights only (their bytes per weight, on their device), never a
  copy of the model.  The pipeline scores every quantizer of a run this way.

A weight the quantizer cannot quantize (int4-g128 on rows not a multiple of 128) stays in full precision and is
listed in `skipped_modules`, as deployment tools keep such layers.

NF4 has two modes:

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

import contextlib
import copy
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mansu.metrics.accuracy import bootstrap_ci, mcq_accuracy
from mansu.quant.alignment import fits, round_trip
from mansu.quant.nf4 import DEFAULT_BLOCKSIZE, validate_blocksize
from mansu.quant.registry import get_quantizer
from mansu.quant.targets import quant_layout, quantizable_modules

log = logging.getLogger(__name__)

TwinMode = Literal["simulated", "real"]
MODES = ("simulated", "real")


@dataclass
class QuantTwin:
    model: Any  # the quantized copy, eval mode; the original is untouched
    mode: str
    quantized_modules: list[str]  # module names whose weights are quantized
    blocksize: int
    quantizer: str = "nf4"
    skipped_modules: list[str] = field(default_factory=list)  # quantizable, but not by this quantizer's shape rule


NF4Twin = QuantTwin  # the name nf4_twin's callers know


def nf4_twin(model: Any, mode: TwinMode = "simulated", *, blocksize: int = DEFAULT_BLOCKSIZE) -> QuantTwin:
    """The NF4 twin of `model` (a transformers causal LM) in `mode`; the original model is not modified."""
    if mode not in MODES:
        raise ValueError(f"unknown NF4 twin mode {mode!r}: accepted are {', '.join(MODES)}")
    validate_blocksize(blocksize, "nf4_twin")
    return quant_twin(model, "nf4", blocksize=blocksize) if mode == "simulated" else _real_twin(model, blocksize)


def quant_twin(model: Any, quantizer: str = "nf4", *, blocksize: int = DEFAULT_BLOCKSIZE) -> QuantTwin:
    """The simulated twin of `model` under any registered quantizer (a deep copy; the original is not modified).
    `blocksize` applies to nf4 only (the other grids have fixed groups)."""
    get_quantizer(quantizer)
    validate_blocksize(blocksize, "quant_twin")
    twin = copy.deepcopy(model).eval()
    done, skipped = _round_in_place(twin, quantizer, blocksize)
    return QuantTwin(model=twin, mode="simulated", quantized_modules=done, blocksize=blocksize, quantizer=quantizer,
                     skipped_modules=skipped)


@contextlib.contextmanager
def quantized(model: Any, quantizer: str = "nf4", *, blocksize: int = DEFAULT_BLOCKSIZE) -> Iterator[QuantTwin]:
    """`model` itself, its quantizable weights rounded through `quantizer` for the duration of the block and
    restored bit-exactly afterwards (also on error).  Holds the original quantizable weights (their own bytes per
    weight, on their device)."""
    get_quantizer(quantizer)
    validate_blocksize(blocksize, "quantized")
    saved = {name: model.get_submodule(name).weight.detach().clone() for name in quantizable_modules(model)}
    was_training = model.training
    try:
        done, skipped = _round_in_place(model.eval(), quantizer, blocksize)
        yield QuantTwin(model=model, mode="simulated", quantized_modules=done, blocksize=blocksize,
                        quantizer=quantizer, skipped_modules=skipped)
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                model.get_submodule(name).weight.copy_(weight)
        model.train(was_training)


@torch.no_grad()
def _round_in_place(model: Any, quantizer: str, blocksize: int) -> tuple[list[str], list[str]]:
    """W <- RT_q(W) for every quantizable weight q can quantize (in its view); (quantized, skipped) module names.
    Only twins call it: on a deep copy, or inside `quantized`, which restores the weights."""
    qz = get_quantizer(quantizer)
    layout = quant_layout(model)
    done, skipped = [], []
    for name in quantizable_modules(model):
        weight, pname = model.get_submodule(name).weight, f"{name}.weight"
        view = layout.view(pname, weight.detach())
        if not fits(qz, view):
            skipped.append(name)
            continue
        weight.copy_(layout.unview(pname, round_trip(qz, view, blocksize=blocksize, name=pname)))
        done.append(name)
    if skipped:
        log.warning("%s twin: %d module(s) kept in full precision (shape): %s", quantizer, len(skipped),
                    ", ".join(skipped))
    log.info("simulated %s twin: %d modules quantized", quantizer, len(done))
    return done, skipped


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
