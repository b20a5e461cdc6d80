"""Where a model's inputs go: the one definition every forward pass uses (metrics, attribution, unlearning)."""

from __future__ import annotations

from typing import Any


def input_device(model: Any) -> Any:
    """The device input ids must be on: the input embedding's (differs from `model.device` under a device_map)."""
    return model.get_input_embeddings().weight.device
