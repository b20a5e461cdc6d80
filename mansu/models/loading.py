"""Load any local HF causal-LM folder or hub id: fp32/bf16, cpu/cuda/auto, safetensors only, finite weights only.

`device="auto"` uses accelerate's `device_map="auto"`, which spreads a model larger than one GPU
over all visible GPUs (and the CPU). `trust_remote_code` is off unless the caller turns it on.
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


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: accepted are {', '.join(DTYPES)}")
    return torch.float32 if dtype == "fp32" else torch.bfloat16


def _device_kwargs(device: str) -> dict[str, Any]:
    import torch

    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: accepted are {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")
    if device == "auto":
        return {"device_map": "auto"}
    return {"device_map": {"": device}} if device == "cuda" else {}


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


def load_model(name_or_path: str | Path, *, dtype: DType = "fp32", device: Device = "cpu",
               trust_remote_code: bool = False, tokenizer: str | None = None) -> LoadedModel:
    """Load model and tokenizer in eval mode; weights from safetensors only, all finite (else ValueError).

    `tokenizer`: None = AutoTokenizer on the model folder; "fast" = the model's tokenizer.json exactly as saved
    (PreTrainedTokenizerFast: AutoTokenizer may rebuild a saved word-level tokenizer as the architecture's BPE);
    a path = that tokenizer folder (AutoTokenizer) or tokenizer.json file (exactly as saved)."""
    from transformers import AutoModelForCausalLM

    name = str(name_or_path)
    torch_dtype, placement = _torch_dtype(dtype), _device_kwargs(device)
    validate_tokenizer_choice(tokenizer)  # before the (possibly 8B) weights load
    config = load_config(name, trust_remote_code=trust_remote_code)
    require_causal_lm(config, name)
    source = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, **placement)
        tok = load_tokenizer(source, tokenizer, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ValueError(f"{name}: cannot load weights/tokenizer ({str(exc).splitlines()[0]}); "
                         "mansu loads safetensors weights only") from None
    check_finite_weights(model, name)
    model.eval()
    log.info("loaded %s (%s, %s)", name, dtype, device)
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
