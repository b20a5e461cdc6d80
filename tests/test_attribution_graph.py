"""The tensor graph code (node spaces, edge lists, selection, pruning, keep matrices, CAD) gives exactly what the
Python loops it replaced gave (the reference kept in bench/graph_bench.py), on tiny models of every family, on
synthetic graphs full of ties, and on the demo model; streamed EAP-IG does not depend on how records are batched;
the faithfulness search gives the same numbers with its activation cache on or off."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mansu.attribution.cad import cad
from mansu.attribution.circuit import Circuit, FaithfulnessEvaluator, prune, select_circuit
from mansu.attribution.eap import AttributionGraph, attribute
from mansu.attribution.edges import valid_matrix
from mansu.attribution.engine import NodeSpace
from mansu.models.components import ModelLayout, model_layout
from mansu.testing import tiny_model, toy_records, toy_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "graph_bench.py"


def _reference():
    spec = importlib.util.spec_from_file_location("graph_bench", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Reference


Reference = _reference()


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


@pytest.fixture(scope="module")
def recs():
    return toy_records(12)


def assert_same_as_reference(graph: AttributionGraph, after: AttributionGraph | None = None) -> None:
    """Every selection, n and threshold; keep matrices; prune; CAD (value and contributions exact, CI to 1e-12)."""
    total = int(graph.valid.sum())
    assert torch.equal(valid_matrix(graph.upstream, graph.downstream), Reference.valid(graph.upstream,
                                                                                        graph.downstream))
    assert graph.edges() == Reference.edges(graph)
    sizes = sorted({0, 1, 2, 3, 5, total // 7, total // 3, total // 2, total - 1, total, total + 4})
    for method in ("top_n", "greedy"):
        for n in sizes:
            for do_prune in (True, False):
                new = select_circuit(graph, method=method, n_edges=n, do_prune=do_prune)
                assert new.edges == Reference.select(graph, method, n_edges=n, do_prune=do_prune), (method, n)
                assert torch.equal(new.keep_matrix(graph), Reference.keep_matrix(new.edges, graph))
    magnitudes = sorted({abs(s) for _, _, s in graph.edges()})
    for tau in (0.0, magnitudes[len(magnitudes) // 2], magnitudes[-1], magnitudes[-1] * 2):
        assert select_circuit(graph, method="threshold", threshold=tau).edges == \
            Reference.select(graph, "threshold", threshold=tau)
    if after is not None:
        edges = select_circuit(graph, method="greedy", n_edges=total // 3).edges
        new, ref = cad(graph, after, Circuit(edges), n_boot=300), Reference.cad(graph, after, edges, n_boot=300)
        assert new.value == ref["value"] and new.per_edge == ref["per_edge"]
        assert new.ci_low == pytest.approx(ref["ci"][0], rel=1e-12, abs=1e-15)
        assert new.ci_high == pytest.approx(ref["ci"][1], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma", "mistral"])
def test_tiny_models_match_reference(family, tok, recs):
    model = tiny_model(family, kv_heads=2 if family in ("qwen2", "mistral") else None, vocab_size=len(tok))
    before = attribute(model, tok, recs, ig_steps=4, batch_size=6, per_example=True)
    layout = model_layout(model)
    assert torch.equal(before.valid, Reference.valid(layout.upstream_nodes(), layout.downstream_nodes()))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    after = attribute(model, tok, recs, ig_steps=4, batch_size=6, per_example=True)
    assert_same_as_reference(before, after)


def _synthetic(n_layers: int, n_heads: int, seed: int, levels: int) -> AttributionGraph:
    """Scores on a coarse grid (many exact ties, many zeros, both signs), so every tie-break rule is exercised."""
    layout = ModelLayout("llama", "llama", n_layers, n_heads, n_heads, 1, n_heads, "model.layers")
    space = NodeSpace.of(layout)
    gen = torch.Generator().manual_seed(seed)
    per = torch.randint(-levels, levels + 1, (6, len(space.upstream), len(space.downstream)), generator=gen).float()
    per = per * space.valid
    meta = {"metric": "logit_diff", "corruption": "counterfactual", "record_indices": list(range(6))}
    return AttributionGraph(space.upstream, space.downstream, per[0], space.valid, torch.zeros(6), torch.ones(6),
                            per, meta)


@pytest.mark.parametrize("n_layers,n_heads,levels", [(1, 2, 1), (3, 4, 2), (11, 3, 3), (4, 12, 5)])
def test_ties_and_layouts_match_reference(n_layers, n_heads, levels):
    # 11 layers: node names a10.* sort before a2.* as strings, which is how the old heap broke ties
    for seed in range(3):
        graph = _synthetic(n_layers, n_heads, seed, levels)
        after = _synthetic(n_layers, n_heads, seed + 10, levels)
        assert_same_as_reference(graph, after)


def test_prune_of_named_edges_matches_reference():
    edges = [("a0.h1", "m0"), ("m0", "logits"), ("input", "a0.h0"), ("a0.h0", "a1.h1"), ("a1.h1", "logits"),
             ("input", "m1"), ("a0.h0", "a1.h1"), ("x", "y")]
    for k in range(len(edges) + 1):
        assert prune(edges[:k]) == Reference.prune(edges[:k])
    assert prune(edges) == [("input", "a0.h0"), ("a0.h0", "a1.h1"), ("a1.h1", "logits")]


def test_keep_matrix_rejects_unknown_nodes(tok):
    graph = _synthetic(1, 2, 0, 1)
    with pytest.raises(ValueError, match="'a7.h0' is not in the graph"):
        Circuit([("a7.h0", "logits")]).keep_matrix(graph)


def test_streamed_scores_do_not_depend_on_batching(tok, recs):
    model = tiny_model("qwen2", kv_heads=2, vocab_size=len(tok))
    one = attribute(model, tok, recs, ig_steps=3, batch_size=1, per_example=True)
    all_ = attribute(model, tok, recs, ig_steps=3, batch_size=12, per_example=True)
    scale = float(one.per_example.abs().max())
    assert scale > 0
    assert torch.allclose(one.per_example, all_.per_example, atol=1e-5 * scale)
    assert torch.equal(one.per_example[:, ~one.valid], torch.zeros(len(recs), int((~one.valid).sum())))


@pytest.mark.parametrize("corruption", ["counterfactual", "mean"])
def test_faithfulness_cache_off_equals_cache_on(corruption, tok, recs):
    model = tiny_model("llama", vocab_size=len(tok))
    graph = attribute(model, tok, recs, ig_steps=2, batch_size=4, corruption=corruption)
    circuit = select_circuit(graph, method="greedy", n_edges=12)
    cached = FaithfulnessEvaluator(model, tok, recs, batch_size=4, corruption=corruption)
    streamed = FaithfulnessEvaluator(model, tok, recs, batch_size=4, corruption=corruption, cache_mb=0)
    assert all(t is not None for t in cached.cached) and all(t is None for t in streamed.cached)
    a, b = cached.evaluate(circuit, graph), streamed.evaluate(circuit, graph)
    assert a.faithfulness == b.faithfulness and 0 < abs(a.faithfulness) < 10
    assert cached.evaluate(circuit, graph).faithfulness == a.faithfulness         # the cache is not consumed
    with pytest.raises(ValueError, match="cache_mb must be >= 0"):
        FaithfulnessEvaluator(model, tok, recs, cache_mb=-1)
