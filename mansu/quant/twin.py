"""A model's quantized twins (NF4 and any registered quantizer), and the PTQ gap acc(Q(model)) - acc(model) with a
paired bootstrap CI.  A twin is never a second copy of the model: it is the model itself, inside a `with` block.

Any quantizer q of mansu.quant.registry, simulated (`quantized(model, q)`): every quantizable weight W computes as
its round trip RT_q(W) = q.dequantize(q.quantize(W)) in q's view (bit-exact with q's library; Conv1D weights
transposed), compute in the model's dtype.  A forward pre-hook swaps each quantizable module's weight for its
round trip just before that module runs and a forward hook swaps the original back right after, so at rest the
parameters are the originals and the extra memory is one layer's rounded weight (its dtype's bytes per element of
that one tensor) plus, under autograd, the rounded weights the graph keeps for backward.  Each forward recomputes
the round trips (compute, not memory), unless all of them fit in TWIN_CACHE_MB: then each round trip is kept for
the block (one rounded copy of the quantizable weights, at most TWIN_CACHE_MB; the demo's 34 MB) and recomputed
only when its weight changed in place (its version counter moved); an 8B model recomputes per forward as above.
Disk- or CPU-offloaded weights (accelerate, device "meta") are refused.

A weight the quantizer cannot quantize (int4-g128 on rows not a multiple of 128) stays in full precision and is
listed in `skipped_modules`, as deployment tools keep such layers.

NF4 has two modes (`nf4_twin(model, mode)`):

* "simulated": `quantized(model, "nf4")` above (mansu.quant.nf4, bit-exact with bitsandbytes); Conv1D weights
  (GPT-2) are quantized transposed, as bitsandbytes stores them (mansu.quant.targets.QuantLayout).
* "real": each quantizable module is swapped, for the block, for a bitsandbytes Linear4bit quantized from the
  in-memory weight on that weight's own device (bnb.nn.Params4bit(...).to(device), what transformers' 4-bit
  loader does; no save/reload through disk), compute dtype float32; the original modules are put back on exit.
  Extra memory: the packed codes and absmax (~0.56 B per quantized weight).  Their weights dequantize exactly to
  the simulated round trip, but bitsandbytes' CPU kernel computes single-row matmuls in bf16 on CPUs with
  avx512_bf16, so logits differ slightly (log-probabilities by ~1e-2) and an MCQ answer whose top two choices are
  that close may flip.

PTQ gap per split, on the same examples, paired:

    gap = mean_i (c_i^NF4 - c_i^full),   c = 1 if the example is answered correctly
    95% CI = percentile bootstrap of that mean, resampling examples (the same resample for both models).

A positive forget gap means NF4 brought forgotten answers back (the failure of Zhang et al., ICLR 2025).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
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
TWIN_CACHE_MB = 512   # a simulated twin keeps its round trips when they all fit in this (module docstring)
MODES = ("simulated", "real")


@dataclass
class QuantTwin:
    model: Any  # the caller's model itself, computing quantized inside the block (eval mode)
    mode: str
    quantized_modules: list[str]  # module names whose weights are quantized
    blocksize: int
    quantizer: str = "nf4"
    skipped_modules: list[str] = field(default_factory=list)  # quantizable, but not by this quantizer's shape rule
    rounded: Callable[[str], torch.Tensor] | None = None  # parameter name -> the weight the forward computes with


NF4Twin = QuantTwin  # the name nf4_twin's callers know


def nf4_twin(model: Any, mode: TwinMode = "simulated", *,
             blocksize: int = DEFAULT_BLOCKSIZE) -> contextlib.AbstractContextManager[QuantTwin]:
    """`with nf4_twin(model, mode) as twin:` `model` computes as its NF4 twin in `mode` inside the block and is
    restored on exit (also on error).  Bad settings raise here, before the block."""
    if mode not in MODES:
        raise ValueError(f"unknown NF4 twin mode {mode!r}: accepted are {', '.join(MODES)}")
    validate_blocksize(blocksize, "nf4_twin")
    if mode == "real" and blocksize != DEFAULT_BLOCKSIZE:
        raise ValueError(f"real NF4 loading uses bitsandbytes' blocksize 64 (transformers has no option), "
                         f"got {blocksize}; use mode='simulated' for other block sizes")
    return quantized(model, "nf4", blocksize=blocksize) if mode == "simulated" else _real_twin(model)


def quantized(model: Any, quantizer: str = "nf4", *,
              blocksize: int = DEFAULT_BLOCKSIZE) -> contextlib.AbstractContextManager[QuantTwin]:
    """`with quantized(model, q) as twin:` `model` itself, each quantizable weight computing as its round trip
    through `q` inside the block (swapped in per module call, see the module docstring); parameters untouched at
    rest.  `blocksize` applies to nf4 only (the other grids have fixed groups).  Bad settings raise here."""
    qz = get_quantizer(quantizer)
    validate_blocksize(blocksize, "quantized")
    return _simulated(model, qz, blocksize)


@contextlib.contextmanager
def _simulated(model: Any, qz: Any, blocksize: int) -> Iterator[QuantTwin]:
    quantizer = qz.name
    layout = quant_layout(model)

    def rounded(pname: str) -> torch.Tensor:
        weight = model.get_parameter(pname).detach()
        view = round_trip(qz, layout.view(pname, weight), blocksize=blocksize, name=pname)
        return layout.unview(pname, view).to(weight.dtype).contiguous()

    done, skipped = _split_fitting(model, qz, layout)
    weights = [model.get_submodule(name).weight for name in done]
    if sum(w.numel() * w.element_size() for w in weights) <= TWIN_CACHE_MB * 2**20:
        rounded = _kept(model, rounded)
    was_training = model.training
    with _swapped_weights(model, {name: rounded for name in done}):
        model.eval()
        log.info("simulated %s twin: %d modules quantized", quantizer, len(done))
        try:
            yield QuantTwin(model=model, mode="simulated", quantized_modules=done, blocksize=blocksize,
                            quantizer=quantizer, skipped_modules=skipped, rounded=rounded)
        finally:
            model.train(was_training)


def _kept(model: Any, rounded: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """`rounded`, each result kept until its weight changes in place (the parameter's version counter)."""
    cache: dict[str, tuple[int, torch.Tensor]] = {}

    def fn(pname: str) -> torch.Tensor:
        version = model.get_parameter(pname)._version
        hit = cache.get(pname)
        if hit is None or hit[0] != version:
            hit = cache[pname] = (version, rounded(pname))
        return hit[1]
    return fn


def _split_fitting(model: Any, qz: Any, layout: Any) -> tuple[list[str], list[str]]:
    """(quantized, skipped) quantizable module names: skipped when `qz` cannot quantize the weight's shape."""
    done, skipped = [], []
    for name in quantizable_modules(model):
        weight = model.get_submodule(name).weight
        if weight.device.type == "meta":
            raise ValueError(f"quantized twin: weight {name}.weight is offloaded by accelerate (disk or CPU offload); "
                             "twins compute with every quantizable weight in memory: give the devices more memory or "
                             "use --device cpu/cuda")
        (done if fits(qz, layout.view(f"{name}.weight", weight.detach())) else skipped).append(name)
    if skipped:
        log.warning("%s twin: %d module(s) kept in full precision (shape): %s", qz.name, len(skipped),
                    ", ".join(skipped))
    return done, skipped


@contextlib.contextmanager
def _swapped_weights(model: Any, rounded: dict[str, Callable[[str], torch.Tensor]]) -> Iterator[None]:
    """For each module named in `rounded`, its weight is `rounded[name](param name)` during the module's own forward
    call (pre-hook, run before any other hook) and the original Parameter again right after (forward hook, also when
    the forward raises).  The swap replaces the entry of module._parameters, never the Parameter's values, so the
    autograd graph keeps the rounded tensor and parameters are bit-identical at rest."""
    stash: dict[int, list] = {}  # id(module) -> [original Parameter, depth of nested calls]
    handles = []

    def make_pre(fn: Callable[[str], torch.Tensor], pname: str):
        def pre(module, args):
            if id(module) in stash:  # a call from inside its own forward or hooks keeps the swap in place
                stash[id(module)][1] += 1
                return
            original = module._parameters["weight"]
            with torch.no_grad():
                module._parameters["weight"] = fn(pname)
            stash[id(module)] = [original, 1]
        return pre

    def post(module, args, output):
        entry = stash.get(id(module))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            module._parameters["weight"] = stash.pop(id(module))[0]

    modules = {name: model.get_submodule(name) for name in rounded}
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(make_pre(rounded[name], f"{name}.weight"), prepend=True))
            handles.append(module.register_forward_hook(post, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in modules.values():  # an interrupted forward leaves nothing swapped
            if id(module) in stash:
                module._parameters["weight"] = stash.pop(id(module))[0]


@contextlib.contextmanager
def _real_twin(model: Any) -> Iterator[QuantTwin]:
    """Each quantizable module replaced by a bitsandbytes Linear4bit quantized from its in-memory weight on its own
    device for the block; the original modules are put back on exit."""
    originals: dict[str, Any] = {}
    was_training = model.training
    try:
        for name, is_conv in quantizable_modules(model).items():
            module = model.get_submodule(name)
            _require_in_memory(name, module.weight)
            originals[name] = module
            _replace_module(model, name, _linear4bit(module, is_conv))
        log.info("real bitsandbytes NF4 twin: %d Linear4bit modules", len(originals))
        yield QuantTwin(model=model.eval(), mode="real", quantized_modules=list(originals),
                        blocksize=DEFAULT_BLOCKSIZE)
    finally:
        for name, module in originals.items():
            _replace_module(model, name, module)
        model.train(was_training)


def _require_in_memory(name: str, weight: torch.Tensor) -> None:
    if weight.device.type == "meta":
        raise ValueError(f"real NF4 twin: weight {name}.weight is offloaded by accelerate; the twin quantizes every "
                         "quantizable weight in memory: give the devices more memory or use --device cpu/cuda")


@torch.no_grad()
def _linear4bit(module: Any, is_conv: bool) -> Any:
    """bnb Linear4bit (NF4, blocksize 64, float32 compute) holding `module`'s weight ([out, in]: Conv1D's W.T),
    quantized on the weight's device as transformers' 4-bit loader does (Params4bit.to(device))."""
    import bitsandbytes as bnb

    weight = module.weight.detach()
    weight = weight.t().contiguous() if is_conv else weight
    out_features, in_features = weight.shape
    has_bias = getattr(module, "bias", None) is not None
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias, compute_dtype=torch.float32,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False,
                                     blocksize=DEFAULT_BLOCKSIZE).to(weight.device)
    if has_bias:
        layer.bias = torch.nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return layer


def _replace_module(model: Any, name: str, module: Any) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


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
    full = {split: mcq_accuracy(model, tokenizer, records, fmt=fmt, batch_size=batch_size, n_boot=10, seed=seed)
            for split, records in (("forget", forget_records), ("retain", retain_records))}
    gaps = {}
    with nf4_twin(model, mode, blocksize=blocksize) as twin:
        for split, records in (("forget", forget_records), ("retain", retain_records)):
            quant = mcq_accuracy(twin.model, tokenizer, records, fmt=fmt, batch_size=batch_size, n_boot=10, seed=seed)
            gaps[split] = paired_gap(full[split].correct, quant.correct, n_boot=n_boot, seed=seed)
    return PTQGap(forget=gaps["forget"], retain=gaps["retain"], mode=mode, fmt=fmt,
                  quantized_modules=twin.quantized_modules)
