"""EAP-IG, the minimal forget circuit and CAD on the demo model (a trained LlamaForCausalLM, cloze MCQ forget set).

CAD's canonical tests fix its meaning: a logit bias on the answer tokens hides the answers and leaves the circuit's
attribution exactly unchanged (an invariance of the logit-difference metric); fine-tuning only the unembedding to
avoid the answers (a realistic suppression) reverses the readout, so CAD is high but nearly all of it is reversal
and shrinkage, not rerouting; ablating the circuit's top components erases it (high CAD, attribution that moved).
"""

from __future__ import annotations

import json

import pytest
import torch

from mansu.attribution.cad import cad
from mansu.attribution.cad_cases import answer_bias, fine_tuned, top_components, zeroed
from mansu.attribution.cad_parts import reroutes
from mansu.attribution.circuit import (
    FaithfulnessEvaluator,
    circuit_parameter_masks,
    select_circuit,
    smallest_faithful_circuit,
)
from mansu.attribution.eap import attribute, exact_edge_effects
from mansu.attribution.stats import spearman
from mansu.models.hooks import count_hooks, hooks

N_RECORDS = 32



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def forget(demo_records):
    return demo_records["forget"][:N_RECORDS]


@pytest.fixture(scope="module")
def graph(demo_lm, forget):
    return attribute(demo_lm.model, demo_lm.tokenizer, forget, ig_steps=8, batch_size=32, per_example=True)


@pytest.fixture(scope="module")
def circuit(demo_lm, forget, graph):
    return smallest_faithful_circuit(demo_lm.model, demo_lm.tokenizer, forget, graph, target=0.8, batch_size=32)


def test_demo_scores_agree_with_exact_patching(demo_lm, forget, graph):
    # All 134 edges, one exact patching pass each, on each half of the records: the full effect is the mean of the
    # halves, and half their difference estimates its standard error over records (the patching noise). Edges whose
    # exact effect is within 2 standard errors of 0 rank at random (over all edges rho was 0.87 here and 0.75 on
    # another CPU's demo model), so the rank agreement is asserted over the edges whose effect is above the noise.
    half = len(forget) // 2
    first, second = (exact_edge_effects(demo_lm.model, demo_lm.tokenizer, part, batch_size=32)
                     for part in (forget[:half], forget[half:]))
    exact, noise = (first + second) / 2, (first - second).abs() / 2
    valid = graph.valid
    clear = valid & (exact.abs() > 2 * noise)
    assert int(clear.sum()) >= int(valid.sum()) // 3, "too few edges above the patching noise to rank"
    assert spearman(graph.scores[clear], exact[clear]) >= 0.8
    top = torch.argsort(graph.scores[valid].abs(), descending=True)[:10]
    assert torch.equal(torch.sign(graph.scores[valid][top]), torch.sign(exact[valid][top]))
    target = float((graph.metric_corrupt - graph.metric_clean).mean())
    assert abs(float(graph.scores[0].sum()) - target) <= 0.01 * abs(target)
    assert count_hooks(demo_lm.model) == 0


def test_smallest_faithful_circuit(demo_lm, forget, graph, circuit):
    assert circuit.faithfulness >= 0.8 and circuit.metadata["reached"]
    n = circuit.metadata["n_edges_requested"]
    smaller = select_circuit(graph, method="greedy", n_edges=n - 1)
    ev = FaithfulnessEvaluator(demo_lm.model, demo_lm.tokenizer, forget, batch_size=32)
    assert ev.evaluate(smaller, graph).faithfulness < 0.8                 # minimal in the searched family
    assert len(circuit.edges) < int(graph.valid.sum()) / 4


def test_cad_invariant_to_an_answer_logit_bias(demo_lm, forget, graph, circuit):
    from mansu.metrics.accuracy import mcq_accuracy

    model, tok = demo_lm.model, demo_lm.tokenizer
    bias = answer_bias(model, tok, forget)

    def add_bias(module, args, output):
        return output + bias
    with hooks([(model.lm_head, "forward", add_bias, False)]):
        suppressed_acc = mcq_accuracy(model, tok, forget).accuracy
        after = attribute(model, tok, forget, ig_steps=8, batch_size=32, per_example=True)
    assert mcq_accuracy(model, tok, forget).accuracy - suppressed_acc >= 0.5
    result = cad(graph, after, circuit, n_boot=500)
    assert result.value < 0.05 and result.ci_high < 0.05
    assert result.per_fact["cad"]["ci_high"] < 0.05      # every record's own CAD is unchanged too


def test_cad_rerouting_low_for_unembedding_finetune(demo_lm, forget, graph, circuit):
    # realistic behavioural suppression: only the unembedding learns to avoid the answers; every internal
    # component computes what it did, so the circuit's attribution may rescale or reverse but must not move
    from mansu.metrics.accuracy import mcq_accuracy

    before = demo_lm.model.lm_head.weight.detach().clone()
    flags = [p.requires_grad for p in demo_lm.model.parameters()]
    with fine_tuned(demo_lm.model, demo_lm.tokenizer, forget, lambda m: [m.lm_head.weight]) as model:
        assert mcq_accuracy(model, demo_lm.tokenizer, forget).accuracy <= 0.3
        after = attribute(model, demo_lm.tokenizer, forget, ig_steps=8, batch_size=32, per_example=True)
    assert torch.equal(demo_lm.model.lm_head.weight, before)      # put back exactly: no model copy was made
    assert [p.requires_grad for p in demo_lm.model.parameters()] == flags
    parts = cad(graph, after, circuit, n_boot=500).parts
    print({k: round(v["value"], 3) for k, v in parts.items()})
    assert parts["cad"]["value"] > 0.5                   # CAD alone would call this erasure
    assert parts["rerouting"]["ci_high"] < 0.3 and parts["moved_beyond_noise"]["ci_high"] < 0.3   # raw: 0.31
    assert reroutes(parts, 0.3) is False


def test_cad_high_for_structural_erasure(demo_lm, demo_records):
    # at the runs' attribution (DEMO_ATTRIBUTION: all 120 forget records, 2 IG steps): moved_beyond_noise compares
    # halves of the records, and halves of 32 are too noisy to show this move (CI low 0.20 measured at 32 x 8)
    from mansu.metrics.accuracy import mcq_accuracy
    from mansu.unlearn.demo_settings import DEMO_ATTRIBUTION

    forget = demo_records["forget"][:DEMO_ATTRIBUTION["attribution_records"]]
    steps = DEMO_ATTRIBUTION["ig_steps"]
    graph = attribute(demo_lm.model, demo_lm.tokenizer, forget, ig_steps=steps, batch_size=32, per_example=True)
    circuit = smallest_faithful_circuit(demo_lm.model, demo_lm.tokenizer, forget, graph, target=0.8, batch_size=32)
    top = top_components(graph, circuit)
    with zeroed(demo_lm.model, top) as model:
        after = attribute(model, demo_lm.tokenizer, forget, ig_steps=steps, batch_size=32, per_example=True)
        accuracy = mcq_accuracy(model, demo_lm.tokenizer, forget).accuracy
    assert mcq_accuracy(demo_lm.model, demo_lm.tokenizer, forget).accuracy == 1.0   # the weights are back
    result = cad(graph, after, circuit, n_boot=500)
    print(f"structural erasure of {top}: CAD {result.value:.3f} ({result.ci_low:.3f}-{result.ci_high:.3f})")
    assert result.value > 0.5 and result.ci_low > 0.4
    assert reroutes(result.parts, 0.3) is True           # the circuit's attribution moved, not just shrank
    assert (result.ci_high - result.ci_low) / 2 <= 0.05  # CAD's CI on this fixed case (0.020 measured)
    fact = result.per_fact["cad"]                        # per fact: 0.823 [0.805, 0.842] measured
    assert fact["value"] > 0.5 and (fact["ci_high"] - fact["ci_low"]) / 2 <= 0.05
    print(f"forget accuracy after erasure: {accuracy:.3f}")
    assert accuracy < 1.0
    ablated_edges = [e for e in result.per_edge if any(node in e.split("->") for node in top)]
    assert sum(result.per_edge[e] for e in ablated_edges) > 0.5 * result.value


def test_demo_graph_saved_reloaded_exported(demo_lm, graph, circuit, tmp_path):
    from mansu.attribution.serialize import load_circuit, load_graph, save_circuit, save_graph, to_circuit_tracer

    save_graph(graph, tmp_path, "before", model=demo_lm.model, circuit=circuit)
    save_circuit(circuit, demo_lm.model, tmp_path)
    back = load_graph(tmp_path, "before")
    circuit2, masks = load_circuit(tmp_path)
    assert torch.equal(back.scores, graph.scores) and circuit2.edges == circuit.edges
    expected = circuit_parameter_masks(demo_lm.model, circuit)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], expected[k]) for k in masks)
    data = json.loads((tmp_path / "circuit.json").read_text())
    assert 0 < data["owned_fraction"] < 1
    from mansu.attribution.cad import cad as cad_fn
    from mansu.attribution.serialize import load_cad, save_cad

    save_cad({"after_fp": cad_fn(graph, back, circuit, n_boot=50)}, tmp_path)
    assert load_cad(tmp_path)["after_fp"]["value"] == 0.0
    exported = to_circuit_tracer(back, circuit=circuit2, slug="demo-forget")
    (tmp_path / "tracer.json").write_text(json.dumps(exported))
    assert {n["clerp"] for n in exported["nodes"]} == set(circuit.nodes)


def test_cad_after_nf4_is_small_but_nonzero(demo_assets, demo_lm, forget, graph, circuit):
    """CAD after PTQ: the NF4 (bitsandbytes) demo model keeps its circuit; quantization noise moves scores a little."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    nf4 = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, quantization_config=quant,
                                               device_map={"": "cpu"}).eval()
    after = attribute(nf4, demo_lm.tokenizer, forget, ig_steps=8, batch_size=32, per_example=True)
    result = cad(graph, after, circuit, n_boot=500)
    assert 0 < result.value < 0.05 and result.ci_high < 0.1


def test_demo_graph_code_matches_python_loops(graph, circuit):
    """Selection, pruning, keep matrices and CAD on the demo graph equal the Python loops they replaced."""
    import dataclasses

    from test_attribution_graph import Reference, assert_same_as_reference

    gen = torch.Generator().manual_seed(0)
    noisy = graph.per_example * (1 + 0.5 * torch.randn(graph.per_example.shape, generator=gen))
    after = dataclasses.replace(graph, per_example=noisy, scores=noisy.mean(0))
    assert_same_as_reference(graph, after)
    assert circuit.edges == Reference.select(graph, "greedy", n_edges=circuit.metadata["n_edges_requested"])
