"""The closed sets of choices a run has, each defined once: every validator, CLI flag and app picker derives from
these Literals (methods and quantizers have registries of their own)."""

from __future__ import annotations

from typing import Literal, get_args

Device = Literal["cpu", "cuda", "auto"]          # auto: accelerate's device_map over the GPUs (and CPU/disk)
DType = Literal["auto", "fp32", "bf16"]          # auto: bf16 when the model goes to a GPU, else fp32
# The base as given, or snapped to a quantizer's grid first: "natural", "nf4-grid", "<quantizer>", "<quantizer>:<f>"
# (a fraction f of the groups); an open form, validated by mansu.quant.alignment.parse_alignment (the one validator).
Alignment = str
NF4Mode = Literal["simulated", "real"]           # bit-exact dequantized twin, or bitsandbytes' Linear4bit
MCQFormat = Literal["cloze", "letter"]

DEVICES: tuple[str, ...] = get_args(Device)
DTYPES: tuple[str, ...] = get_args(DType)
ALIGNMENTS: tuple[str, ...] = ("natural", "nf4-grid")  # the presets pickers offer first
NF4_MODES: tuple[str, ...] = get_args(NF4Mode)
