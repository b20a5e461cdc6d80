"""Load any local HF causal-LM folder or hub id: fp32/bf16, cpu/cuda/auto, safetensors only, finite weights only.

dtype "auto" (the default) is bf16 when the model goes to a GPU (device cuda, or auto with a GPU visible) and fp32
on the CPU.

`device="auto"` spreads the model over every visible GPU and the CPU with accelerate: the device map is planned
first on an empty (meta) model with `infer_auto_device_map` (optionally under `max_memory`), and that exact map is
loaded.  A plan that offloads modules (to "disk", or to "cpu" next to a GPU, where accelerate keeps the weights
off the module and streams them in per forward) is refused before any weight loads, with one line saying how
much the model needs, unless the caller allows offload (`allow_offload`, forward-only uses such as evaluation):
mansu writes unlearning updates into parameters in place and cannot update offloaded weights.  Without offload,
each parameter lives on its own device and every mansu write lands there (mansu.unlearn.params).
`trust_remote_code` is off unless the caller turns it on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mansu.choices import DEVICES, DTYPES, Device, DType

log = logging.getLogger(__name__)



@dataclass
class LoadedModel:
    model: Any        # a transformers PreTrainedModel in eval mode
    tokenizer: Any    # its tokenizer (PreTrainedTokenizerBase)
    name: str         # the path or hub id it came from


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """"fp32" or "bf16": dtype "auto" is bf16 when the model goes to a GPU, fp32 on the CPU."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: accepted are {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "bf16" if on_gpu else "fp32"


def torch_dtype(dtype: str, device: str = "cpu"):
    import torch

    return torch.float32 if resolve_dtype(dtype, device) == "fp32" else torch.bfloat16


def _device_kwargs(device: str) -> dict[str, Any]:
    import torch

    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: accepted are {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")
    return {"device_map": {"": device}} if device == "cuda" else {}


def plan_device_map(config, dtype, *, max_memory: dict | None = None, trust_remote_code: bool = False) -> dict:
    """accelerate's device map for the model of `config` in `dtype` (planned on empty weights, nothing loaded)."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    empty.tie_weights()
    return infer_auto_device_map(empty, max_memory=max_memory, no_split_module_classes=empty._no_split_modules or [],
                                 dtype=dtype)


def offloaded_modules(device_map: dict) -> list[str]:
    """Modules a device map offloads: on "disk", or on "cpu" while a GPU holds the rest (accelerate then streams
    their weights in per forward and leaves the parameters on the meta device)."""
    gpu = any(d not in ("cpu", "disk") for d in device_map.values())
    return [m for m, d in device_map.items() if d == "disk" or (d == "cpu" and gpu)]


def check_no_offload(config, dtype, device_map: dict, name: str) -> None:
    """ValueError (one line, before any weight loads) when `device_map` offloads modules."""
    off = offloaded_modules(device_map)
    if not off:
        return
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    need = sum(p.numel() * p.element_size() for p in empty.parameters()) / 2 ** 30
    where = sorted({str(device_map[m]) for m in off})
    raise ValueError(f"{name}: device 'auto' would offload {len(off)} of {len(device_map)} modules to "
                     f"{' and '.join(where)} (the model needs {need:.2f} GiB of weights); mansu writes unlearning "
                     "updates into parameters in place and cannot update offloaded weights: use --dtype bf16, "
                     "a device with more memory, or a smaller model")


def load_config(name_or_path: str, *, trust_remote_code: bool = False):
    """The model's config, with a one-line error for paths that are not HF model folders or ids."""
    from transformers import AutoConfig

    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_local and not local.exists():
        raise FileNotFoundError(f"model folder not found: {name_or_path}; "
                                "give a local HF model folder or a hub id (org/name)")
    if local.exists() and not (local / "config.json").is_file():
        raise ValueError(f"{name_or_path}: not a Hugging Face model folder (no config.json inside)")
    try:
        return AutoConfig.from_pretrained(str(local) if local.exists() else name_or_path,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"unknown model {name_or_path!r}: not a local model folder nor a reachable hub id "
                         f"({first})") from None


def require_causal_lm(config, name: str) -> None:
    from transformers import AutoModelForCausalLM

    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ValueError(f"{name}: model type {config.model_type!r} is not a causal language model; "
                         "mansu needs an AutoModelForCausalLM architecture (Llama, Qwen, Gemma, Mistral, GPT-2, ...)")


def load_model(name_or_path: str | Path, *, dtype: DType = "auto", device: Device = "cpu",
               trust_remote_code: bool = False, tokenizer: str | None = None, max_memory: dict | None = None,
               allow_offload: bool = False, offload_folder: str | Path | None = None) -> LoadedModel:
    """Load model and tokenizer in eval mode; weights from safetensors only, all finite (else ValueError).

    device "auto": the planned device map (under `max_memory`, accelerate's format: {0: "20GiB", "cpu": "60GiB"})
    must not offload unless `allow_offload` (then disk-offloaded weights go to `offload_folder`); see the module
    docstring.

    `tokenizer`: None = AutoTokenizer on the model folder; "fast" = the model's tokenizer.json exactly as saved
    (PreTrainedTokenizerFast: AutoTokenizer may rebuild a saved word-level tokenizer as the architecture's BPE);
    a path = that tokenizer folder (AutoTokenizer) or tokenizer.json file (exactly as saved)."""
    from transformers import AutoModelForCausalLM

    name = str(name_or_path)
    weights_dtype, placement = torch_dtype(dtype, device), _device_kwargs(device)
    validate_tokenizer_choice(tokenizer)  # before the (possibly 8B) weights load
    config = load_config(name, trust_remote_code=trust_remote_code)
    require_causal_lm(config, name)
    if device == "auto":
        plan = plan_device_map(config, weights_dtype, max_memory=max_memory, trust_remote_code=trust_remote_code)
        if not allow_offload:
            check_no_offload(config, weights_dtype, plan, name)
        placement = {"device_map": plan, **({"offload_folder": str(offload_folder)} if offload_folder else {})}
    source = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=weights_dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, **placement)
        tok = load_tokenizer(source, tokenizer, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ValueError(f"{name}: cannot load weights/tokenizer ({str(exc).splitlines()[0]}); "
                         "mansu loads safetensors weights only") from None
    check_finite_weights(model, name)
    model.eval()
    log.info("loaded %s (%s, %s)", name, resolve_dtype(dtype, device), device)
    return LoadedModel(model=model, tokenizer=tok, name=name)


TOKENIZER_CHOICES = "'fast' (the model's tokenizer.json exactly as saved) or a tokenizer folder or tokenizer.json " \
                    "file (default: AutoTokenizer on the model folder)"


def validate_tokenizer_choice(tokenizer: str | None) -> None:
    if tokenizer is not None and tokenizer != "fast" and not Path(tokenizer).expanduser().exists():
        raise ValueError(f"tokenizer {tokenizer!r} not found; give {TOKENIZER_CHOICES}")


def load_tokenizer(source: str, tokenizer: str | None = None, *, trust_remote_code: bool = False):
    """The tokenizer for model `source` as chosen by `tokenizer` (see `load_model`)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tokenizer is None:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer == "fast":
        local = Path(source)
        if local.is_dir() and not (local / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer 'fast' needs {local / 'tokenizer.json'}, which does not exist; "
                             f"give {TOKENIZER_CHOICES}")
        return PreTrainedTokenizerFast.from_pretrained(source)  # tokenizer.json + special tokens, no rebuild
    validate_tokenizer_choice(tokenizer)
    path = Path(tokenizer).expanduser()
    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def check_finite_weights(model, name: str = "model") -> None:
    """ValueError naming the first parameter that holds a NaN or Inf (a model with them scores nonsense)."""
    import torch

    bad: list[tuple[str, int, int, int]] = []
    for pname, p in model.named_parameters():
        if p.device.type == "meta" or not p.is_floating_point():
            continue  # offloaded by accelerate: not in memory to check
        flat = p.detach().reshape(-1)
        step = 1 << 24  # bounded temporary memory on an 8B model's embedding
        if all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step)):
            continue
        bad.append((pname, int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum()), flat.numel()))
    if bad:
        pname, n_nan, n_inf, n = bad[0]
        more = f" ({len(bad) - 1} more tensors have non-finite values)" if len(bad) > 1 else ""
        raise ValueError(f"{name}: weight {pname} has {n_nan + n_inf} non-finite values of {n} ({n_nan} NaN, "
                         f"{n_inf} Inf){more}; mansu will not score or unlearn a model with NaN/Inf weights")
