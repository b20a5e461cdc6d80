"""Memory of EAP-IG per batch, as formulas of the batch shape (no torch: the spec and the CLI import this cheaply).

With b examples of s positions, U upstream and V downstream nodes, residual width d, H heads per layer and float32
state (4 B), one batch of `mansu.attribution.eap.attribute` holds

    activation differences  diff [b, U, s, d]            4 b s U d
    per-example scores      [b, U, V]                    4 b U V
    input streams           e_clean, e_corrupt, e_k      12 b s d
    one layer's node-input gradients while scored         8 b s H d      (the gradient and its scaled copy)

and frees all of it before the next batch. The faithfulness search (`FaithfulnessEvaluator`) caches corrupted node
outputs [b, U, s, d] (4 b s U d per batch) up to ``CACHE_MB`` MiB and recomputes the rest; an edited run holds one
such buffer. The model's own autograd activations come on top (attention runs on H per-head copies of the batch in
every layer, see `mansu.models.hooks`), and scale with b the same way, so `batch_size` is the knob for both.
"""

from __future__ import annotations

CACHE_MB = 2048   # corrupted activations the faithfulness search keeps between evaluations (MiB); 0 recomputes all


def eap_batch_bytes(b: int, s: int, n_up: int, n_down: int, d: int, n_heads: int) -> int:
    """Bytes of EAP-IG state for one batch (the formula in the module docstring)."""
    return 4 * b * s * n_up * d + 4 * b * n_up * n_down + 12 * b * s * d + 8 * b * s * n_heads * d


def graph_nodes(n_layers: int, n_heads: int) -> tuple[int, int]:
    """(U, V): input + (heads + MLP) per layer upstream; (heads + MLP) per layer + logits downstream."""
    per_layer = n_layers * (n_heads + 1)
    return 1 + per_layer, per_layer + 1
