"""How much memory a run needs, estimated before anything loads, against what its device has.

    weights      parameters x the dtype's bytes (counted on the meta device from the config: nothing loaded)
    engine       the unlearning method's peak bytes per coordinate (Method.peak_bytes(config): its state plus a
                 step's transient vectors, e.g. MANSU 18 B + 44 B x update_fraction x steps for its candidates' log
                 and restore buffer: 21.5 B at the demo's 0.002 x 40, 18.7 B at the default 0.002 x 8) x the
                 coordinates it may update: every quantizable weight for the methods that are not circuit-restricted;
                 a circuit's size is known only after attribution, so a circuit-restricted method (MANSU) is checked
                 again then (`check_engine_memory`, before the unlearning starts)
    attribution  the circuit search's activation cache: --attribution-cache-mb, or less when the attributed records'
                 activations are smaller (`activation_bytes`)

The device's memory is the GPU's free memory (cuda) or the host's available memory (cpu / auto), unless
--memory-limit-gb says less (a shared machine).  A run that needs more stops with one line saying how much it
needs, what it has and which flag lowers it.
"""

from __future__ import annotations

import os

GIB = 2 ** 30


def available_bytes(device: str) -> int:
    """Free memory of the device a run computes on (cuda: the GPU's free memory; else the host's available)."""
    if device == "cuda":
        import torch

        if torch.cuda.is_available():  # else loading says so in one line
            return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def model_sizes(config, dtype) -> tuple[int, int, int]:
    """(parameters, quantizable weights, bytes of the weights in `dtype`), counted on empty weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from mansu.quant.targets import quantizable_parameter_names

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = dict(empty.named_parameters())
    quant = sum(params[n].numel() for n in quantizable_parameter_names(empty))
    return sum(p.numel() for p in params.values()), quant, sum(p.numel() * p.element_size() for p in params.values())


def estimate(spec, config, dtype) -> dict:
    """The run's estimated needs in bytes (see the module docstring)."""
    from mansu.unlearn.methods import METHODS

    method = METHODS[spec.config.method]
    n_params, n_quant, weights = model_sizes(config, dtype)
    restricted = method.circuit_restricted and spec.attribution
    per_coordinate = method.peak_bytes(spec.config)
    engine = 0 if restricted else int(per_coordinate * n_quant)
    attribution = min(spec.attribution_cache_mb * 2 ** 20, activation_bytes(spec, config)) if spec.attribution else 0
    return {"parameters": n_params, "quantizable": n_quant, "weights": weights, "engine": engine,
            "attribution": attribution, "total": weights + engine + attribution,
            "engine_per_coordinate": per_coordinate, "engine_after_circuit": restricted}


def activation_bytes(spec, config, tokens: int = 64) -> int:
    """The corrupted activations the circuit search could cache: records x tokens x nodes x hidden x 4 B, nodes =
    layers x (heads + 2) (each head, the MLP and the residual); `tokens` bounds a record's length."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    return spec.attribution_records * tokens * layers * (heads + 2) * hidden * 4


def check_memory(spec, config, dtype) -> dict:
    """ValueError (one line, before loading) when the estimate exceeds the device's memory; returns the estimate."""
    need = estimate(spec, config, dtype)
    have = spec.memory_limit_gb * GIB if spec.memory_limit_gb else available_bytes(spec.device)
    if need["total"] > have:
        engine = ("counted once the circuit is known" if need["engine_after_circuit"] else
                  f"{_gib(need['engine'])} = {need['engine_per_coordinate']:.3g} B x {need['quantizable']:,} weights")
        raise ValueError(f"{spec.config.method} on this model needs ~{_gib(need['total'])} GiB (weights "
                         f"{_gib(need['weights'])}, unlearning state {engine}, attribution cache "
                         f"{_gib(need['attribution'])}) but {spec.device} has {_gib(have)} GiB: "
                         f"{_what_lowers(spec, need)}")
    return need


def check_engine_memory(config, n_coordinates: int, limit_gb: float | None, device: str) -> None:
    """ValueError before the unlearning starts when a circuit-restricted method's state for the circuit's
    coordinates (UnlearnConfig `config`) exceeds the device's free memory (the model is already loaded)."""
    from mansu.unlearn.methods import METHODS

    per_coordinate = METHODS[config.method].peak_bytes(config)
    need = per_coordinate * n_coordinates
    have = limit_gb * GIB if limit_gb else available_bytes(device)
    if need > have:
        raise ValueError(f"{config.method}'s unlearning state for the circuit's {n_coordinates:,} weights needs "
                         f"~{_gib(need)} GiB ({per_coordinate:.3g} B each) but {device} has "
                         f"{_gib(have)} GiB free: give --mlp-neuron-mass 0.8 (a circuit MLP owns only its top "
                         "neurons), lower --circuit-target (a smaller circuit) or use a device with more memory")


def _what_lowers(spec, need: dict) -> str:
    """The flags that lower the largest part of the estimate."""
    parts = sorted(("weights", "engine", "attribution"), key=lambda k: -need[k])
    return {"weights": "use --dtype bf16, a smaller model or a device with more memory",
            "engine": "use --optimizer sgd (no Adam moments), a circuit-restricted method (mansu) or a smaller model",
            "attribution": "lower --attribution-cache-mb"}[parts[0]]


def _gib(n: float) -> str:
    return f"{n / GIB:.3g}"
