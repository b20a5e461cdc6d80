"""Component naming for stock Hugging Face causal LMs: the nodes of the attribution graph and the modules behind them.

Index conventions (one place, used unchanged in artifacts and the app):

* ``input``      the residual stream entering decoder layer 0 (token embedding, plus position embedding for GPT-2,
                 times sqrt(d) for Gemma): what the first pre-norm reads.
* ``a{L}.h{H}``  query head H of layer L. Its output in the residual stream is its slice of the o_proj input times the
                 matching column block of o_proj: ``out_h = z[..., H*hd:(H+1)*hd] @ W_o[:, H*hd:(H+1)*hd].T``
                 (GPT-2: ``c_proj`` of ``attn``, a Conv1D whose weight is stored transposed). Under GQA every query
                 head is its own node; its key/value head is ``H // (n_heads // n_kv_heads)``.
* ``m{L}``       the MLP of layer L (its output added to the residual stream). Its hidden neurons (the input of
                 down_proj / GPT-2 mlp.c_proj) index the neuron grain of ownership (`mlp_neuron_axes`).
* ``logits``     the unembedding read-out (final norm + lm_head) of the last residual stream.

Upstream nodes (edge sources) are ``input, a0.*, m0, a1.*, m1, ...``; downstream nodes (edge targets) are
``a0.*, m0, a1.*, m1, ..., logits``. An edge u -> v exists when u's output is in the residual stream that v reads:
heads of layer L read the stream entering L, m{L} reads it after attention L, logits read the final stream.

Supported families are the pre-norm decoders whose per-head outputs add linearly into the residual stream:
Llama, Mistral, Qwen2, Qwen3, Gemma (v1) and GPT-2. Gemma 2/3 apply a norm after o_proj (the sum of heads is
renormalised), so a single head's residual contribution is not defined there; they are rejected with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

NodeKind = Literal["input", "head", "mlp", "logits"]

# model_type -> family whose module names we know
FAMILIES: dict[str, str] = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama", "gpt2": "gpt2",
}
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2")


@dataclass(frozen=True)
class ModelLayout:
    """Where each component of a stock HF decoder lives, and the graph's node names."""

    family: str               # "llama" (Llama/Mistral/Qwen2/Qwen3/Gemma module names) or "gpt2"
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    base_prefix: str          # named_parameters prefix of the decoder layers, e.g. "model.layers" / "transformer.h"

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    def upstream_nodes(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [head_name(layer, h) for h in range(self.n_heads)] + [f"m{layer}"]
        return names

    def downstream_nodes(self) -> list[str]:
        names: list[str] = []
        for layer in range(self.n_layers):
            names += [head_name(layer, h) for h in range(self.n_heads)] + [f"m{layer}"]
        return names + ["logits"]


def head_name(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


def parse_node(name: str) -> tuple[NodeKind, int, int]:
    """(kind, layer, head) of a node name; layer/head are -1 where they do not apply."""
    if name == "input":
        return "input", -1, -1
    if name == "logits":
        return "logits", -1, -1
    if name.startswith("a") and ".h" in name:
        layer, head = name[1:].split(".h")
        return "head", int(layer), int(head)
    if name.startswith("m") and name[1:].isdigit():
        return "mlp", int(name[1:]), -1
    raise ValueError(f"unknown node name {name!r}: accepted are input, a{{L}}.h{{H}}, m{{L}}, logits")


def node_order(name: str) -> float:
    """Position in the forward pass: heads of layer L at 2L, m{L} at 2L+1, input first, logits last."""
    kind, layer, _ = parse_node(name)
    return {"input": -1.0, "logits": float("inf")}.get(kind, 2 * layer + (1 if kind == "mlp" else 0))


def edge_exists(upstream: str, downstream: str) -> bool:
    """True when `upstream`'s output is part of the residual stream `downstream` reads."""
    return node_order(upstream) < node_order(downstream)


def model_layout(model: Any) -> ModelLayout:
    """The layout of a stock HF causal LM; unsupported architectures raise ValueError listing the supported ones."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported architecture {model_type!r} for attribution: supported families are "
                         f"{', '.join(SUPPORTED)}")
    family = FAMILIES[model_type]
    if family == "gpt2":
        n_heads, d_model = config.n_head, config.n_embd
        return ModelLayout(family, model_type, config.n_layer, n_heads, n_heads, d_model // n_heads, d_model,
                           "transformer.h")
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return ModelLayout(family, model_type, config.num_hidden_layers, n_heads, n_kv, head_dim, config.hidden_size,
                       "model.layers")


def decoder_layers(model: Any, layout: ModelLayout) -> Any:
    """The ModuleList of decoder layers."""
    return model.transformer.h if layout.family == "gpt2" else model.model.layers


@dataclass(frozen=True)
class LayerModules:
    """The modules of one decoder layer that the hooks attach to."""

    attn_norm: Any   # pre-attention norm: its input is the residual stream the heads read
    attn: Any        # attention module (called with the normed stream)
    o_proj: Any      # output projection: its input is the concatenated per-head outputs z
    mlp_norm: Any    # pre-MLP norm: its input is the residual stream the MLP reads
    mlp: Any


def layer_modules(model: Any, layout: ModelLayout, layer: int) -> LayerModules:
    block = decoder_layers(model, layout)[layer]
    if layout.family == "gpt2":
        return LayerModules(block.ln_1, block.attn, block.attn.c_proj, block.ln_2, block.mlp)
    return LayerModules(block.input_layernorm, block.self_attn, block.self_attn.o_proj,
                        block.post_attention_layernorm, block.mlp)


def final_norm(model: Any, layout: ModelLayout) -> Any:
    return model.transformer.ln_f if layout.family == "gpt2" else model.model.norm


def _prefix(layout: ModelLayout, layer: int) -> str:
    return f"{layout.base_prefix}.{layer}"


def head_parameter_slices(layout: ModelLayout, layer: int, head: int) -> dict[str, tuple[int, slice]]:
    """The parameter slices head (layer, head) owns: {param name: (dim, slice)} in the *logical* (unquantized) shape.

    Llama-style: q_proj rows of the head, k_proj/v_proj rows of its kv head (shared within a GQA group),
    the matching bias entries when present, and o_proj columns of the head. GPT-2 (Conv1D, weight [in, out]):
    the q/k/v column blocks of c_attn and the rows of c_proj.
    """
    hd, p = layout.head_dim, _prefix(layout, layer)
    q = slice(head * hd, (head + 1) * hd)
    kv_head = head // layout.group_size
    kv = slice(kv_head * hd, (kv_head + 1) * hd)
    if layout.family == "gpt2":
        d = layout.d_model
        return {f"{p}.attn.c_attn.weight": (1, q), f"{p}.attn.c_attn.bias": (0, q),
                f"{p}.attn.c_attn.weight#k": (1, slice(d + q.start, d + q.stop)),
                f"{p}.attn.c_attn.bias#k": (0, slice(d + q.start, d + q.stop)),
                f"{p}.attn.c_attn.weight#v": (1, slice(2 * d + q.start, 2 * d + q.stop)),
                f"{p}.attn.c_attn.bias#v": (0, slice(2 * d + q.start, 2 * d + q.stop)),
                f"{p}.attn.c_proj.weight": (0, q)}
    a = f"{p}.self_attn"
    return {f"{a}.q_proj.weight": (0, q), f"{a}.q_proj.bias": (0, q),
            f"{a}.k_proj.weight": (0, kv), f"{a}.k_proj.bias": (0, kv),
            f"{a}.v_proj.weight": (0, kv), f"{a}.v_proj.bias": (0, kv),
            f"{a}.o_proj.weight": (1, q)}


def mlp_parameter_prefix(layout: ModelLayout, layer: int) -> str:
    """Every parameter under this prefix belongs to m{layer} (gate/up/down for Llama, c_fc/c_proj for GPT-2)."""
    return f"{_prefix(layout, layer)}.mlp."


def mlp_neuron_axes(layout: ModelLayout, layer: int) -> dict[str, int]:
    """{param name: dim} along which m{layer}'s parameters are indexed by its hidden neurons (the one list of the
    neuron grain): Llama-style rows of gate_proj and up_proj (and their bias entries) and columns of down_proj;
    GPT-2 (Conv1D, weight [in, out]) columns of c_fc.weight, entries of c_fc.bias and rows of c_proj.weight.
    The output bias (GPT-2 c_proj.bias, Llama down_proj.bias) is shared by every neuron and owned by none."""
    m = mlp_parameter_prefix(layout, layer)
    if layout.family == "gpt2":
        return {f"{m}c_fc.weight": 1, f"{m}c_fc.bias": 0, f"{m}c_proj.weight": 0}
    return {f"{m}gate_proj.weight": 0, f"{m}gate_proj.bias": 0, f"{m}up_proj.weight": 0, f"{m}up_proj.bias": 0,
            f"{m}down_proj.weight": 1}


def mlp_hidden_module(model: Any, layout: ModelLayout, layer: int) -> Any:
    """The module whose input is m{layer}'s hidden activations [.., intermediate] (down_proj; GPT-2 mlp.c_proj)."""
    mlp = layer_modules(model, layout, layer).mlp
    return mlp.c_proj if layout.family == "gpt2" else mlp.down_proj


def node_parameters(model: Any, layout: ModelLayout, node: str) -> list[str]:
    """Names (from model.named_parameters()) of the parameters a node owns a slice of."""
    kind, layer, head = parse_node(node)
    names = {n for n, _ in model.named_parameters()}
    if kind == "head":
        owned = {k.split("#")[0] for k in head_parameter_slices(layout, layer, head)}
        return sorted(n for n in owned if n in names)
    if kind == "mlp":
        prefix = mlp_parameter_prefix(layout, layer)
        return sorted(n for n in names if n.startswith(prefix))
    return []
