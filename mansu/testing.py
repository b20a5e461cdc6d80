"""Fixtures for tests and benchmarks, kept out of the library's paths: tiny random-init models of every supported
family (built from configs: no downloads), toy MCQ records and a word-level tokenizer for them, a tiny saved model
with forget/retain files on disk, synthetic attribution graphs in the real naming scheme, and synthetic run
folders in the documented artifact schemas (for app tests that must not wait for the backend)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mansu.data.records import MCQRecord
from mansu.io import write_json_atomic
from mansu.runs import layout
from mansu.runs.store import create_run, write_cad, write_status
from mansu.scorecard import build_scorecard, write_scorecard
from mansu.viz.artifacts import GraphData

Family = Literal["llama", "qwen2", "gpt2", "mistral", "qwen3", "gemma"]
NAMES = ["Zorb", "Quil", "Marn", "Tesk", "Vory", "Plim", "Drax", "Holt", "Nesk", "Brio", "Cald", "Wemb"]
COLORS = ["red", "blue", "green", "amber", "violet", "grey"]


def toy_records(n: int = 12, seed: int = 0) -> list[MCQRecord]:
    """Cloze MCQ records "The colour of <Name> is ?" with single-word subjects and answers."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        name = NAMES[i % len(NAMES)]
        choices = rng.sample(COLORS, 4)
        records.append(MCQRecord(f"Which colour does {name} wear ?", tuple(choices), rng.randrange(4), name))
    return records


def toy_tokenizer() -> Any:
    from mansu.models.demo import build_tokenizer

    return build_tokenizer([" ".join(NAMES + COLORS) + " Which colour does wear ? Answer :"])


def tiny_model(family: Family = "llama", *, vocab_size: int = 64, layers: int = 2, hidden: int = 32, heads: int = 4,
               kv_heads: int | None = None, seed: int = 0) -> Any:
    """A random-init causal LM of the given family, small enough for exhaustive edge patching."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads or heads, intermediate_size=2 * hidden, max_position_embeddings=64)
    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
                               bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(config).eval()
    classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
               "mistral": (tf.MistralConfig, tf.MistralForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
               "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM)}
    if family not in classes:
        raise ValueError(f"unknown family {family!r}: accepted are gpt2, {', '.join(classes)}")
    config_cls, model_cls = classes[family]
    extra = {"head_dim": hidden // heads} if family in ("qwen3", "gemma") else {}
    return model_cls(config_cls(**common, **extra)).eval()


def tiny_llama(vocab_size: int = 64, *, layers: int = 2, hidden: int = 32, heads: int = 4,
               kv_heads: int | None = None, seed: int = 0) -> Any:
    """A random-init LlamaForCausalLM small enough for exhaustive checks."""
    return tiny_model("llama", vocab_size=vocab_size, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                      seed=seed)


TINY_WORDS = "Where is Zorb Quil Marn Tesk Vory Plim Drax Holt from ? red blue green amber violet grey Answer :"


def write_tiny_world(root: Path, *, hidden: int = 64) -> dict[str, str]:
    """A tiny saved Llama (hidden 64 unless given; 128 fits int4-g128's groups, word-level tokenizer) with 4 forget
    and 4 retain MCQ records on disk."""
    from mansu.models.demo import build_tokenizer

    root = Path(root)
    tok = build_tokenizer([TINY_WORDS])
    model = tiny_llama(vocab_size=len(tok), layers=2, hidden=hidden, heads=4)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(root / "model", safe_serialization=True)
    tok.save_pretrained(root / "model")
    names, colors = TINY_WORDS.split()[2:10], ["red", "blue", "green", "amber"]
    rows = [{"question": f"Where is {n} from ?", "choices": colors, "answer": i % 4, "subject": n}
            for i, n in enumerate(names)]
    for split, part in (("forget", rows[:4]), ("retain", rows[4:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return {"model": str(root / "model"), "forget": str(root / "forget.jsonl"), "retain": str(root / "retain.jsonl"),
            "root": str(root)}


LINE_WORDS = "Zorb Quil Marn Tesk Vory Plim Drax Holt red blue green amber violet grey".split()


def random_lines(rng: random.Random, n: int, words: int = 12) -> list[str]:
    """n random lines of `words` words from LINE_WORDS (all in TINY_WORDS' vocabulary, equal token lengths)."""
    return [" ".join(rng.choice(LINE_WORDS) for _ in range(words)) for _ in range(n)]


def write_memorised_text(root: Path, splits: dict[str, list[str]], memorise: tuple[str, ...],
                         steps: int) -> dict[str, str]:
    """A tiny Llama (word-level tokenizer) trained for `steps` full-batch AdamW steps until it recites the lines
    of the splits named in `memorise`; every split is written as text records ({"text": ...} per line).
    Returns {"model": dir, split: jsonl path}."""
    import torch

    from mansu.models.demo import build_tokenizer

    root = Path(root)
    tok = build_tokenizer([TINY_WORDS])
    model = tiny_llama(vocab_size=len(tok), layers=2, hidden=64, heads=4)
    model.config.pad_token_id = tok.pad_token_id
    ids = torch.tensor([tok(t)["input_ids"] for name in memorise for t in splits[name]])  # equal lengths
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.save_pretrained(root / "model", safe_serialization=True)
    tok.save_pretrained(root / "model")
    paths = {"model": str(root / "model")}
    for name, lines in splits.items():
        paths[name] = str(root / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return paths


def synthetic_graph(n_layers: int, n_heads: int, n_edges: int | None = None, seed: int = 0) -> GraphData:
    """A random complete-ish graph in the real naming scheme (benchmarks and tests)."""
    rng = np.random.default_rng(seed)
    names = ["input"]
    for layer in range(n_layers):
        names += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
    names.append("logits")
    src, dst = np.triu_indices(len(names), k=1)
    # no edges into input, none out of logits; same-layer heads do not feed each other
    layers = np.array([-1] + [layer for layer in range(n_layers) for _ in range(n_heads + 1)] + [n_layers])
    keep = ~((layers[src] == layers[dst]) & np.array([".h" in names[d] for d in dst]))
    src, dst = src[keep], dst[keep]
    if n_edges is not None and n_edges < src.shape[0]:
        pick = np.sort(rng.choice(src.shape[0], n_edges, replace=False))
        src, dst = src[pick], dst[pick]
    weight = rng.standard_normal(src.shape[0]) * rng.exponential(1.0, src.shape[0])
    return GraphData(names, layers, rng.standard_normal(len(names)), [[] for _ in names], src, dst, weight,
                     rng.random(len(names)) < 0.2, {"n_layers": n_layers})


def _graph_json(seed: int, scale: float = 1.0) -> dict:
    g = synthetic_graph(2, 8, seed=seed)
    return {"n_layers": 2,
            "nodes": [{"name": n, "layer": int(l), "score": float(s) * scale, "in_circuit": bool(c),
                       "params": [f"model.layers.{l}.mlp.down_proj.weight"] if n.startswith("m") else []}
                      for n, l, s, c in zip(g.names, g.layers, g.scores, g.in_circuit)],
            "links": [{"source": g.names[s], "target": g.names[d], "weight": float(w) * scale}
                      for s, d, w in zip(g.src, g.dst, g.weight)]}


EDGES = np.logspace(-4, 2, 61)  # mansu.quant.survival's histogram_edges()


def _hist(rng: np.random.Generator, centre: float) -> list[int]:
    """Counts [under, 60 log bins, over] as mansu.quant.survival stores them."""
    samples = np.exp(rng.normal(np.log(centre), 1.0, 5000))
    return np.bincount(np.searchsorted(EDGES, samples, side="right"), minlength=62).tolist()


def _acc(value: float) -> dict:
    return {"accuracy": value, "ci_low": max(0.0, value - 0.05), "ci_high": min(1.0, value + 0.05), "n": 200}


def _quant_metrics(forget_after: float, recall: dict[str, float], n: int = 120) -> dict[str, Any]:
    """Per-question forget correctness (fp: the first forget_after * n questions right; quantizer q: also the next
    recall[q] * n) and the per-quantizer entries an eval stage writes, so the PTQ-gap matrix has data."""
    k = round(forget_after * n)
    fp = [int(i < k) for i in range(n)]
    quant = {q: [int(i < k + round(r * n)) for i in range(n)] for q, r in recall.items()}
    split = lambda c: {**_acc(sum(c) / n), "n": n, "correct": c}  # noqa: E731
    gap = {q: {"forget": {"gap": (sum(c) - k) / n, "ci_low": (sum(c) - k) / n - 0.03, "ci_high": (sum(c) - k) / n
                          + 0.03}} for q, c in quant.items()}
    return {"unlearned_fp": {"forget": split(fp), "retain": _acc(0.97)},
            "unlearned_quant": {q: {"forget": split(c), "retain": _acc(0.94)} for q, c in quant.items()},
            "ptq_gap_by_quantizer": gap}


def _sample_cad_parts(cad: float, moved: float) -> dict[str, dict[str, float]]:
    """A cad.json `parts` entry (mansu.attribution.cad_parts): CAD split half shrinkage, half rerouting."""
    part = lambda v: {"value": v, "ci_low": v - 0.05, "ci_high": v + 0.05}  # noqa: E731
    return {"cad": part(cad), "shrinkage": part(cad / 2), "reversal": part(0.0), "rerouting": part(cad / 2),
            "sign_flip": part(0.0), "redistribution": part(moved), "outside_shift": part(0.0),
            "moved_beyond_noise": part(moved)}


def write_sample_run(root: Path, method: str = "mansu", seed: int = 0, forget_after: float = 0.3, *,
                     quant_recall: dict[str, float] | None = None, base_alignment: str = "nf4-grid") -> Path:
    """Create a finished run with every artifact the app draws; returns its folder.  `quant_recall` ({quantizer:
    fraction of the forget questions it brings back}) adds per-question correctness and per-quantizer results."""
    rng = np.random.default_rng(seed)
    spec = {"model": "demo/model", "forget": "demo/forget.jsonl", "retain": "demo/retain.jsonl",
            "unlearn": {"method": method, "kappa": 1.0}, "base_alignment": base_alignment}
    run = create_run({"kind": "unlearn", "method": method, "spec": spec}, f"sample-{method}", root)
    for stage, scale in (("before", 1.0), ("after_fp", 0.4), ("after_nf4", 0.45)):
        write_json_atomic(layout.attribution_json(run, stage), _graph_json(seed, scale))
    centre = 1.2 if method == "mansu" else 0.05
    write_json_atomic(run / layout.SURVIVAL, {
        "kind": "nf4_survival", "histogram_edges": EDGES.tolist(),
        "overall": {"median_ratio": centre, "frac_code_changed": 0.9 if method == "mansu" else 0.05,
                    "histogram": _hist(rng, centre)},
        "layers": {str(l): {"median_ratio": centre, "frac_code_changed": 0.5 + 0.1 * l,
                            "histogram": _hist(rng, centre)} for l in range(2)},
        "tensors": {f"model.layers.{l}.mlp.{k}.weight": {"median_ratio": centre,
                                                         "frac_code_changed": 0.3 + 0.2 * l + 0.1 * i,
                                                         "histogram": _hist(rng, centre)}
                    for l in range(2) for i, k in enumerate(("up_proj", "down_proj"))}})
    metrics = {
        "base_fp": {"forget": _acc(1.0), "retain": _acc(1.0)}, "base_nf4": {"forget": _acc(1.0), "retain": _acc(0.99)},
        "unlearned_fp": {"forget": _acc(forget_after), "retain": _acc(0.97)},
        "unlearned_nf4": {"forget": _acc(forget_after + 0.02), "retain": _acc(0.94)},
        "ptq_gap": {"forget": {"gap": 0.02, "ci_low": -0.01, "ci_high": 0.05}},
        **(_quant_metrics(forget_after, quant_recall) if quant_recall else {})}
    write_json_atomic(run / layout.METRICS, metrics)
    cad = {f"after_{w}": {"value": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n_examples": 64,
                          "per_edge": {f"a0.h{i % 8}->m{i % 2}": 0.1 / (i + 1) for i in range(10)},
                          "parts": _sample_cad_parts(v, moved=v * 0.8),
                          "per_fact": _sample_cad_parts(v + 0.05, moved=v * 0.6)}
           for w, v in (("fp", 0.6 if method == "mansu" else 0.1), ("nf4", 0.55 if method == "mansu" else 0.08))}
    write_cad(run, cad)
    write_scorecard(run, build_scorecard(metrics, cad))
    write_sample_update(run / layout.UPDATE, rng)
    write_status(run, "done", 1, 1, state="finished")
    return run


def write_sample_update(path: Path, rng: np.random.Generator, n: int = 20_000) -> None:
    """update.safetensors in the floor-preview format (`<param>.<field>` arrays, `__epsilon__`)."""
    import torch

    from mansu.io import write_safetensors_atomic

    bins = rng.uniform(0.005, 0.02, n)
    proposal = rng.normal(0, 0.003, n)
    arrays = {"proposal": proposal, "priority": np.abs(proposal), "bin_width": bins,
              "move_up": rng.uniform(0, 1, n) * bins, "move_down": rng.uniform(0, 1, n) * bins,
              "cap_up": np.full(n, 1.0), "cap_down": np.full(n, 1.0), "fisher": rng.exponential(1.0, n)}
    tensors = {f"model.layers.0.mlp.down_proj.weight.{k}": torch.tensor(v, dtype=torch.float32) for k,
               v in arrays.items()}
    tensors["__epsilon__"] = torch.tensor([0.5])
    write_safetensors_atomic(path, tensors)


def write_large_graph_run(root: Path, n_layers: int = 32, n_heads: int = 32, *, seed: int = 0,
                          max_links: int = 2000, n_circuit: int = 200, grow_fraction: float = 0.001) -> Path:
    """A finished run whose three attribution stages are random dense graphs on an n_layers x n_heads layout (32 x 32:
    543k edges, an 8B model's size) saved as the pipeline saves them (`save_graph`: JSON with the `max_links` largest
    links, every edge in the safetensors), with a circuit of the `n_circuit` strongest before-edges. After
    unlearning, every edge halves, one circuit edge in five flips, and a `grow_fraction` of all edges gains a random
    score (attribution moving outside the circuit)."""
    import torch

    from mansu.attribution.circuit import Circuit
    from mansu.attribution.eap import AttributionGraph
    from mansu.attribution.edges import top_order, valid_matrix
    from mansu.attribution.serialize import save_graph
    from mansu.models.components import head_name

    blocks = [name for layer in range(n_layers) for name in [*(head_name(layer, h) for h in range(n_heads)),
                                                              f"m{layer}"]]
    upstream, downstream = ["input", *blocks], [*blocks, "logits"]      # ModelLayout.upstream/downstream_nodes
    valid = valid_matrix(upstream, downstream)
    gen = torch.Generator().manual_seed(seed)
    before = torch.randn(valid.shape, generator=gen) * torch.empty(valid.shape).exponential_(1.0, generator=gen) * valid
    us, vs = torch.nonzero(valid, as_tuple=True)
    strongest = top_order(before, valid)[:n_circuit]
    circuit = Circuit([(upstream[int(us[e])], downstream[int(vs[e])]) for e in strongest], "top-n", None)
    factor = torch.full(valid.shape, 0.5)
    factor[us[strongest[::5]], vs[strongest[::5]]] = -0.3                        # one circuit edge in five flips
    grow = torch.rand(valid.shape, generator=gen) < grow_fraction
    after = before * factor + grow * valid * torch.randn(valid.shape, generator=gen)
    spec = {"model": "synthetic", "unlearn": {"method": "mansu", "kappa": 1.0}, "base_alignment": "nf4-grid"}
    run = create_run({"kind": "unlearn", "method": "mansu", "spec": spec}, f"large-{n_layers}x{n_heads}", root)
    meta = {"n_layers": n_layers, "n_heads": n_heads, "metric": "logit_diff", "corruption": "synthetic"}
    for stage, scores in (("before", before), ("after_fp", after), ("after_nf4", after * 1.05)):
        graph = AttributionGraph(upstream, downstream, scores, valid, torch.zeros(1), torch.zeros(1), None, meta)
        save_graph(graph, run, stage, circuit=circuit, max_links=max_links)
    write_json_atomic(run / layout.CIRCUIT, circuit.to_dict(), add_stamp=True)
    write_status(run, "done", 1, 1, state="finished")
    return run
