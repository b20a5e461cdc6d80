"""EAP-IG on tiny random models: hooks, per-head inputs, scores verified by exact interventions, circuits, masks,
bad input, serialization, captum cross-check and CAD's properties."""

from __future__ import annotations

import json

import pytest
import torch

from mansu.attribution.cad import cad, cad_value
from mansu.attribution.circuit import (
    Circuit,
    FaithfulnessEvaluator,
    circuit_parameter_masks,
    greedy_edges,
    prune,
    select_circuit,
)
from mansu.attribution.eap import AttributionGraph, attribute, exact_edge_effects
from mansu.attribution.stats import spearman
from mansu.data.records import MCQRecord
from mansu.models.components import edge_exists, model_layout
from mansu.models.hooks import NodeCallbacks, count_hooks, node_hooks
from mansu.testing import tiny_model, toy_records, toy_tokenizer

FAMILIES = [("llama", None), ("qwen2", 2), ("gpt2", None)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


@pytest.fixture(scope="module")
def recs():
    return toy_records(12)


def _model(family: str, kv: int | None, tok) -> torch.nn.Module:
    return tiny_model(family, kv_heads=kv, vocab_size=len(tok))


def test_node_names_and_edges(tok):
    layout = model_layout(_model("qwen2", 2, tok))
    assert layout.upstream_nodes()[:3] == ["input", "a0.h0", "a0.h1"]
    assert layout.downstream_nodes()[-1] == "logits" and "m1" in layout.downstream_nodes()
    assert layout.group_size == 2
    assert edge_exists("a0.h1", "m0") and edge_exists("m0", "a1.h0") and not edge_exists("a0.h0", "a0.h1")
    assert not edge_exists("m1", "a1.h0") and edge_exists("input", "logits")


def test_unsupported_architecture_lists_families():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="supported families are llama, mistral, qwen2, qwen3, gemma, gpt2"):
        model_layout(model)


def test_hooks_removed_when_forward_raises(tok):
    model = _model("llama", None, tok)
    layout = model_layout(model)

    def boom(layer, z):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with node_hooks(model, layout, NodeCallbacks(on_heads=boom)):
            model(input_ids=torch.tensor([[1, 2, 3]]))
    assert count_hooks(model) == 0


@pytest.mark.parametrize("family,kv", FAMILIES)
def test_per_head_copies_are_exact_and_isolated(family, kv, tok):
    """Expanded per-head inputs reproduce the stock forward; an edit to one head's input moves only that head."""
    model = _model(family, kv, tok)
    layout = model_layout(model)
    ids = torch.randint(4, len(tok), (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ref = model(input_ids=ids, attention_mask=mask).logits
    seen: dict[str, torch.Tensor] = {}
    zero = NodeCallbacks(head_edit=lambda l, r: torch.zeros(layout.n_heads, *r.shape),
                         on_heads=lambda l, z: seen.setdefault(f"zero{l}", z))
    with torch.no_grad(), node_hooks(model, layout, zero):
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out, ref, atol=1e-6)

    def one_head(layer, resid):
        edit = torch.zeros(layout.n_heads, *resid.shape)
        edit[1] = 0.5 * torch.randn_like(resid) if layer == 0 else 0
        return edit
    with torch.no_grad(), node_hooks(model, layout, NodeCallbacks(head_edit=one_head,
                                                                  on_heads=lambda l, z: seen.setdefault(f"e{l}", z))):
        model(input_ids=ids, attention_mask=mask)
    moved = (seen["e0"] - seen["zero0"]).abs().amax(dim=(0, 1, 3))     # per head
    assert moved[1] > 1e-3 and float(moved[[0, 2, 3]].max()) == 0.0


@pytest.mark.parametrize("family,kv", FAMILIES)
def test_eap_ig_matches_exact_edge_patching(family, kv, tok, recs):
    model = _model(family, kv, tok)
    graph = attribute(model, tok, recs, ig_steps=16, batch_size=6)
    exact = exact_edge_effects(model, tok, recs, batch_size=6)
    valid = graph.valid
    assert int(valid.sum()) == 54                                  # 1+4+1+4+1 upstream x heads/mlps/logits
    assert spearman(graph.scores[valid], exact[valid]) >= 0.9
    top = torch.argsort(graph.scores[valid].abs(), descending=True)[:5]
    assert torch.equal(torch.sign(graph.scores[valid][top]), torch.sign(exact[valid][top]))
    # completeness: the input edges integrate dM along the input path
    target = float((graph.metric_corrupt - graph.metric_clean).mean())
    assert abs(float(graph.scores[0].sum()) - target) <= 0.01 * abs(target)


@pytest.mark.parametrize("corruption", ["mean", "zero"])
def test_mean_and_zero_corruption_complete(corruption, tok, recs):
    model = _model("llama", None, tok)
    graph = attribute(model, tok, recs, ig_steps=16, batch_size=12, corruption=corruption)
    target = float((graph.metric_corrupt - graph.metric_clean).mean())
    assert abs(target) > 1e-4
    # zero ablation drives the path through the RMSNorm singularity at 0: the midpoint rule is coarser there
    tolerance = 0.02 if corruption == "mean" else 0.1
    assert abs(float(graph.scores[0].sum()) - target) <= tolerance * abs(target)


def test_faithfulness_endpoints_and_selection(tok, recs):
    model = _model("llama", None, tok)
    graph = attribute(model, tok, recs, ig_steps=8, batch_size=12)
    ev = FaithfulnessEvaluator(model, tok, recs, batch_size=12)
    full = Circuit([(u, v) for u, v, _ in graph.edges()])
    assert ev.evaluate(full, graph).faithfulness == pytest.approx(1.0, abs=1e-5)
    assert ev.evaluate(Circuit([]), graph).faithfulness == pytest.approx(0.0, abs=1e-5)
    top = select_circuit(graph, method="top_n", n_edges=10, do_prune=False)
    ranked = sorted(graph.edges(), key=lambda e: -abs(e[2]))
    assert set(top.edges) == {(u, v) for u, v, _ in ranked[:10]}
    greedy = greedy_edges(graph, 6)
    assert greedy[0][1] == "logits"
    assert all(v == "logits" or v in {u for u, _ in greedy[:i]} for i, (_, v) in enumerate(greedy))
    assert prune([("a0.h1", "m0"), ("m0", "logits")]) == []                       # a0.h1 has no input
    assert prune([("input", "a0.h1"), ("a0.h1", "m0")]) == []                     # m0 reaches no output
    with pytest.raises(ValueError, match="accepted are top_n, threshold, greedy"):
        select_circuit(graph, method="best")


def test_parameter_masks_gqa_and_gpt2(tok):
    qwen = _model("qwen2", 2, tok)                # 4 query heads, 2 kv heads, head_dim 8
    masks = circuit_parameter_masks(qwen, Circuit([("input", "a0.h3"), ("a0.h3", "m1"), ("m1", "logits")]))
    q, k = masks["model.layers.0.self_attn.q_proj.weight"], masks["model.layers.0.self_attn.k_proj.weight"]
    assert q.shape == (32, 32) and q[24:32].all() and int(q.sum()) == 8 * 32
    assert k.shape == (16, 32) and k[8:16].all() and int(k.sum()) == 8 * 32      # kv head 3 // 2 = 1
    assert masks["model.layers.0.self_attn.q_proj.bias"][24:32].all()
    o = masks["model.layers.0.self_attn.o_proj.weight"]
    assert o[:, 24:32].all() and int(o.sum()) == 32 * 8
    assert masks["model.layers.1.mlp.down_proj.weight"].all() and "model.layers.0.mlp.up_proj.weight" not in masks
    gpt2 = _model("gpt2", None, tok)
    gm = circuit_parameter_masks(gpt2, Circuit([("input", "a0.h1"), ("a0.h1", "logits")]))
    w = gm["transformer.h.0.attn.c_attn.weight"]                    # Conv1D [in=32, out=96]
    assert w[:, 8:16].all() and w[:, 40:48].all() and w[:, 72:80].all() and int(w.sum()) == 32 * 24
    assert gm["transformer.h.0.attn.c_proj.weight"][8:16].all()


def test_bad_input_errors(tok, recs):
    model = _model("llama", None, tok)
    with pytest.raises(ValueError, match="empty forget set"):
        attribute(model, tok, [])
    no_subject = [MCQRecord(r.question, r.choices, r.answer, None) for r in recs]
    with pytest.raises(ValueError, match="use corruption='mean' or 'zero'"):
        attribute(model, tok, no_subject)
    attribute(model, tok, no_subject, corruption="zero", ig_steps=2)           # accepted without a subject
    same_subject = [MCQRecord(r.question.replace(r.subject, "Zorb"), r.choices, r.answer, "Zorb") for r in recs]
    with pytest.raises(ValueError, match="no record has a counterfactual partner"):
        attribute(model, tok, same_subject)
    long = [MCQRecord("Which colour does Zorb wear ? " + "wear " * 80, ("red", "blue"), 0, "Zorb")] + recs[1:]
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        attribute(model, tok, long)
    with pytest.raises(ValueError, match="accepted are logit_diff, logprob"):
        attribute(model, tok, recs, metric="accuracy")
    with pytest.raises(ValueError, match="accepted are counterfactual, mean, zero"):
        attribute(model, tok, recs, corruption="noise")


def test_multi_token_answers_use_summed_logprob(tok):
    """metric='logprob' equals the summed log-probability the accuracy module computes for the answer tokens."""
    from mansu.attribution.data import build_examples, collate, metric_values
    from mansu.metrics.accuracy import cloze_texts, continuation_logprobs

    model = _model("llama", None, tok)
    recs = [MCQRecord(f"Which colour does {n} wear ?", ("red blue", "green amber"), i % 2, n)
            for i, n in enumerate(["Zorb", "Quil", "Marn"])]
    examples, _ = build_examples(model, tok, recs, metric="logprob", corruption="counterfactual")
    assert all(len(e.target_tokens) == 2 for e in examples)
    batch = collate(examples)
    with torch.no_grad():
        ours = metric_values(model(input_ids=batch.clean, attention_mask=batch.mask).logits, batch, "logprob")
    pairs = [(cloze_texts(r)[0], cloze_texts(r)[1][r.answer]) for r in recs]
    assert torch.allclose(ours, torch.tensor(continuation_logprobs(model, tok, pairs)), atol=1e-5)
    graph = attribute(model, tok, recs, metric="logprob", ig_steps=16)
    target = float((graph.metric_corrupt - graph.metric_clean).mean())
    assert abs(float(graph.scores[0].sum()) - target) <= 0.01 * abs(target)


def test_serialization_round_trip_and_tracer_export(tok, recs, tmp_path):
    from mansu.attribution.serialize import load_circuit, load_graph, save_circuit, save_graph, to_circuit_tracer
    from mansu.runs.layout import attribution_json

    model = _model("llama", None, tok)
    graph = attribute(model, tok, recs, ig_steps=4, batch_size=12, per_example=True)
    circuit = select_circuit(graph, method="greedy", n_edges=12)
    save_graph(graph, tmp_path, "before", model=model, circuit=circuit)
    back = load_graph(tmp_path, "before")
    assert torch.equal(back.scores, graph.scores) and torch.equal(back.per_example, graph.per_example)
    assert back.upstream == graph.upstream and back.metadata["record_indices"] == list(range(12))
    data = json.loads(attribution_json(tmp_path, "before").read_text())
    node = next(n for n in data["nodes"] if n["name"] == "a1.h2")
    assert node["layer"] == 1 and "model.layers.1.self_attn.o_proj.weight" in node["params"]
    assert len(data["links"]) == int(graph.valid.sum())
    save_circuit(circuit, model, tmp_path)
    circuit2, masks = load_circuit(tmp_path)
    assert circuit2.edges == circuit.edges
    assert all(torch.equal(masks[k], v) for k, v in circuit_parameter_masks(model, circuit).items())
    tracer = to_circuit_tracer(graph, circuit=circuit)
    assert set(tracer) == {"metadata", "qParams", "nodes", "links"}
    ids = {n["node_id"] for n in tracer["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in tracer["links"])
    assert len(tracer["links"]) == len(circuit.edges)
    with pytest.raises(ValueError, match="accepted are before, after_fp, after_nf4"):
        save_graph(graph, tmp_path, "later")


def test_captum_token_view_matches_input_edges(tok, recs):
    from mansu.attribution.tokens import cross_check, token_attributions

    model = _model("gpt2", None, tok)
    graph = attribute(model, tok, recs, ig_steps=6, batch_size=6, per_example=True)
    tokens = token_attributions(model, tok, recs, ig_steps=6, batch_size=6)
    assert cross_check(tokens, graph) < 1e-3
    # only the swapped subject token differs between clean and corrupted prompts
    assert tokens.scores[0][4] != 0 and all(s == 0 for i, s in enumerate(tokens.scores[0]) if i != 4)


def _graph(per_example: torch.Tensor, names: tuple[list[str], list[str]]) -> AttributionGraph:
    n = per_example.shape[0]
    valid = torch.ones(per_example.shape[1:], dtype=torch.bool)
    return AttributionGraph(names[0], names[1], per_example.mean(0), valid, torch.zeros(n), torch.zeros(n), per_example,
                            {"record_indices": list(range(n)), "metric": "logit_diff", "corruption": "counterfactual"})


def test_cad_properties():
    names = (["input", "a0.h0", "m0"], ["a0.h0", "m0", "logits"])
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(20, 3, 3, generator=gen)
    circuit = Circuit([("input", "a0.h0"), ("a0.h0", "m0"), ("m0", "logits"), ("input", "logits")])
    g = _graph(s, names)
    same = cad(g, g, circuit, n_boot=200)
    assert same.value == 0.0 and same.ci_high == 0.0
    assert cad(g, _graph(torch.zeros_like(s), names), circuit).value == pytest.approx(1.0)
    assert cad(g, _graph(-s, names), circuit).value == pytest.approx(1.0)
    assert cad(g, _graph(s / 10, names), circuit).value == pytest.approx(0.9 / 1.1)
    other = _graph(s + torch.randn(20, 3, 3, generator=gen), names)
    r = cad(g, other, circuit, n_boot=500)
    assert 0 < r.value < 1 and r.ci_low <= r.value <= r.ci_high
    assert sum(r.per_edge.values()) == pytest.approx(r.value)
    assert cad(other, g, circuit).value == pytest.approx(r.value)                          # symmetric
    assert cad(g, other, Circuit(list(reversed(circuit.edges)))).value == pytest.approx(r.value)  # order-free
    x, y = torch.randn(50, 7), torch.randn(50, 7)
    assert float(cad_value(x, y).max()) <= 1 and float(cad_value(3 * x, 3 * y).sub(cad_value(x, y)).abs().max()) < 1e-6
    with pytest.raises(ValueError, match="per_example=True"):
        cad(AttributionGraph(names[0], names[1], s[0], g.valid, s[0, 0], s[0, 0], None, g.metadata), g, circuit)


def test_runs_on_bitsandbytes_nf4_model(tok, recs, tmp_path):
    """The same hooks and passes run on a model whose Linear layers are bitsandbytes NF4 (CAD after PTQ)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = tiny_model("llama", vocab_size=len(tok), hidden=64)
    model.save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    nf4 = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map={"": "cpu"})
    assert type(nf4.model.layers[0].self_attn.o_proj).__name__ == "Linear4bit"
    graph = attribute(nf4, tok, recs, ig_steps=8, batch_size=12)
    target = float((graph.metric_corrupt - graph.metric_clean).mean())
    assert torch.isfinite(graph.scores).all() and abs(target) > 0
    assert abs(float(graph.scores[0].sum()) - target) <= 0.05 * abs(target)
    masks = circuit_parameter_masks(nf4, Circuit([("input", "a0.h1"), ("a0.h1", "logits")]))
    assert masks["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)             # logical, not packed
    assert count_hooks(nf4) == 0


def test_records_without_equal_length_partner_are_dropped(tok, recs):
    model = _model("llama", None, tok)
    odd = MCQRecord("Which colour does Zorb Quil wear ?", recs[0].choices, recs[0].answer, "Zorb Quil")
    graph = attribute(model, tok, [odd] + recs[1:], ig_steps=2)
    assert graph.metadata["n_dropped"] == 1 and graph.metadata["record_indices"] == list(range(1, 12))
    assert graph.metric_clean.shape == (11,)


def test_head_outputs_fast_path_matches_module_path():
    """Per-head residual outputs from the weight (nn.Linear / Conv1D) equal the generic masked o_proj call."""
    from transformers.pytorch_utils import Conv1D

    from mansu.models.hooks import head_residual_outputs

    class Wrapped(torch.nn.Linear):          # a subclass takes the generic path (as Linear4bit does)
        pass
    torch.manual_seed(0)
    z4 = torch.randn(2, 5, 4, 8)
    linear = torch.nn.Linear(32, 16, bias=True)
    wrapped = Wrapped(32, 16, bias=True)
    wrapped.load_state_dict(linear.state_dict())
    fast, slow = head_residual_outputs(linear, z4), head_residual_outputs(wrapped, z4)
    assert fast.shape == (2, 5, 4, 16) and torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(fast.sum(2) + linear.bias, linear(z4.reshape(2, 5, 32)), atol=1e-5)
    conv = Conv1D(16, 32)
    torch.nn.init.normal_(conv.weight)
    assert torch.allclose(head_residual_outputs(conv, z4).sum(2) + conv.bias, conv(z4.reshape(2, 5, 32)), atol=1e-4)
