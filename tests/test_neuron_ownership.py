"""The neuron grain of MLP ownership (mansu.attribution.neurons) on tiny random models of every family: the masks own
exactly the kept neurons' rows/columns, the neuron scores equal an explicit autograd computation and track exact
patching, the selection rule, serialization and old-format circuits (whole MLP)."""

from __future__ import annotations

import json

import pytest
import torch

from mansu.attribution.circuit import Circuit, circuit_parameter_masks
from mansu.attribution.data import metric_values
from mansu.attribution.eap import prepare
from mansu.attribution.neurons import keep_neurons, neuron_scores, quantizable_fraction, with_neuron_grain
from mansu.attribution.serialize import load_circuit, save_circuit
from mansu.attribution.stats import spearman
from mansu.models.components import mlp_hidden_module, mlp_parameter_prefix, model_layout
from mansu.models.hooks import hooks
from mansu.testing import tiny_model, toy_records, toy_tokenizer

FAMILIES = [("llama", None), ("gpt2", None), ("qwen2", 2), ("gemma", None), ("mistral", None)]
EDGES = [("input", "m0"), ("m0", "a1.h1"), ("a1.h1", "m1"), ("m1", "logits")]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


@pytest.fixture(scope="module")
def recs():
    return toy_records(8)


def _model(family: str, kv: int | None, tok) -> torch.nn.Module:
    return tiny_model(family, kv_heads=kv, vocab_size=len(tok))


def _written_by_kept(model, layer: int, kept: list[int]) -> dict[str, torch.Tensor]:
    """{MLP param: entries with a nonzero gradient when only the kept neurons' hidden activations pass}: what the
    kept neurons compute with, found through the real modules (the output bias, shared by all, dropped)."""
    layout = model_layout(model)
    gate = torch.zeros(model.config.intermediate_size if layout.family != "gpt2" else 4 * layout.d_model)
    gate[kept] = 1.0
    down = mlp_hidden_module(model, layout, layer)
    model.zero_grad()
    with hooks([(down, "pre", lambda m, args: (args[0] * gate,), False)]):
        out = model(input_ids=torch.arange(1, 9)[None]).logits
    (out * torch.randn_like(out)).sum().backward()
    prefix = mlp_parameter_prefix(layout, layer)
    return {n: p.grad != 0 for n, p in model.named_parameters()
            if n.startswith(prefix) and p.grad is not None and not n.endswith(("c_proj.bias", "down_proj.bias"))}


@pytest.mark.parametrize("family,kv", FAMILIES)
def test_masks_own_exactly_the_kept_neurons(family, kv, tok):
    model = _model(family, kv, tok)
    if family == "llama":       # biased MLP: the gate/up bias entries of kept neurons are owned too
        model = tiny_model("llama", vocab_size=len(tok))
        model.config.mlp_bias = True
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.bias = torch.nn.Parameter(torch.randn(proj.out_features) * 0.1)
    kept = [1, 5, 6, 17]
    circuit = Circuit(EDGES, neurons={"m1": kept})
    masks = circuit_parameter_masks(model, circuit)
    expected = _written_by_kept(model, 1, kept)
    mlp1 = {n for n in masks if n.startswith(mlp_parameter_prefix(model_layout(model), 1))}
    assert mlp1 == set(expected), "the masks own a parameter the kept neurons do not use, or miss one"
    for name in mlp1:
        assert torch.equal(masks[name], expected[name]), name
    layout = model_layout(model)
    m0 = {n: m for n, m in masks.items() if n.startswith(mlp_parameter_prefix(layout, 0))}
    assert m0 and all(bool(m.all()) for m in m0.values())              # m0 without a neuron list: whole
    whole = circuit_parameter_masks(model, Circuit(EDGES))
    assert sum(int(m.sum()) for m in masks.values()) < sum(int(m.sum()) for m in whole.values())
    heads = {n: m for n, m in whole.items() if "mlp" not in n}
    assert all(torch.equal(masks[n], m) for n, m in heads.items())     # heads keep their slices


def _explicit_scores(model, tok, recs, layer: int, steps: int) -> torch.Tensor:
    """score_i by hand on a Llama (input stream = token embeddings): inputs_embeds interpolated, one autograd.grad
    per example and step, hidden activations read by a plain hook."""
    prep = prepare(model, tok, recs, metric="logit_diff", corruption="counterfactual", batch_size=1, max_records=None)
    down = model.model.layers[layer].mlp.down_proj
    embed = model.get_input_embeddings()
    total = torch.zeros(down.in_features)
    for batch in prep.batches:
        seen = {}
        with hooks([(down, "pre", lambda m, args: seen.__setitem__("a", args[0]), False)]), torch.no_grad():
            model(input_ids=batch.clean)
            clean = seen["a"]
            model(input_ids=batch.corrupt)
            diff = seen["a"] - clean
        e_clean, e_corrupt = embed(batch.clean).detach(), embed(batch.corrupt).detach()
        for k in range(1, steps + 1):
            e_k = e_corrupt + (k - 0.5) / steps * (e_clean - e_corrupt)
            with hooks([(down, "pre", lambda m, args: seen.__setitem__("a", args[0]), False)]):
                value = metric_values(model(inputs_embeds=e_k).logits, batch, "logit_diff").sum()
                grad, = torch.autograd.grad(value, seen["a"])
            total += (diff * grad).sum((0, 1)) / steps
    return total / len(prep.batches)


def test_scores_equal_explicit_autograd(tok, recs):
    model = _model("llama", None, tok)
    got = neuron_scores(model, tok, recs, [0, 1], metric="logit_diff", corruption="counterfactual", ig_steps=3,
                        batch_size=3)
    for layer in (0, 1):
        want = _explicit_scores(model, tok, recs, layer, 3)
        assert torch.allclose(got[layer], want, rtol=1e-4, atol=1e-6), layer
    assert float(got[1].abs().sum()) > 0


def _exact_neuron_effects(model, tok, recs, layer: int) -> torch.Tensor:
    """Mean over examples of M(neuron i's activation set to its corrupted value, every position) - M(clean)."""
    prep = prepare(model, tok, recs, metric="logit_diff", corruption="counterfactual", batch_size=64, max_records=None)
    batch = prep.batches[0]
    down = model.model.layers[layer].mlp.down_proj
    seen = {}
    with torch.no_grad(), hooks([(down, "pre", lambda m, args: seen.__setitem__("a", args[0]), False)]):
        clean_m = metric_values(model(input_ids=batch.clean, attention_mask=batch.mask).logits, batch, "logit_diff")
        model(input_ids=batch.corrupt, attention_mask=batch.mask)
        corrupt = seen["a"]
    effects = torch.zeros(down.in_features)
    for i in range(down.in_features):
        def patch(m, args, i=i):
            a = args[0].clone()
            a[..., i] = corrupt[..., i]
            return (a,)
        with torch.no_grad(), hooks([(down, "pre", patch, False)]):
            patched = metric_values(model(input_ids=batch.clean, attention_mask=batch.mask).logits, batch,
                                    "logit_diff")
        effects[i] = (patched - clean_m).mean()
    return effects


def test_scores_track_exact_single_neuron_patching(tok, recs):
    """The last MLP's neurons write linearly into the stream the final norm reads: attribution and exact patching
    of one neuron agree in value (max error 1.3% of the largest effect measured), rank (Spearman 0.9996) and sign."""
    model = _model("llama", None, tok)
    scores = neuron_scores(model, tok, recs, [1], metric="logit_diff", corruption="counterfactual", ig_steps=8)[1]
    exact = _exact_neuron_effects(model, tok, recs, 1)
    assert spearman(scores, exact) >= 0.95
    assert float((scores - exact).abs().max()) <= 0.05 * float(exact.abs().max())
    big = exact.abs() > 0.1 * exact.abs().max()
    assert torch.equal(torch.sign(scores[big]), torch.sign(exact[big]))


def test_selection_rule():
    scores = torch.tensor([0.1, -5.0, 0.0, 3.0, 1.0, 0.9])     # |total| 10
    assert keep_neurons(scores, 0.5) == [1]                       # 5 of 10
    assert keep_neurons(scores, 0.8, max_fraction=1.0) == [1, 3]  # 8 of 10
    assert keep_neurons(scores, 0.81, max_fraction=1.0) == [1, 3, 4]
    assert keep_neurons(scores, 0.99, max_fraction=0.5) == [1, 3, 4]   # capped at 3 of 6
    assert keep_neurons(scores, 1.0) == list(range(6))            # 1.0: the whole MLP
    assert keep_neurons(torch.zeros(4), 0.8) == [0]               # at least one
    for bad in (0.0, -0.2, 1.5, "off"):
        with pytest.raises(ValueError, match=r"mlp neuron mass must be in \(0, 1\]"):
            keep_neurons(scores, bad)


def test_spec_flag_is_validated():
    from mansu.spec import RunSpec

    assert RunSpec().mlp_neuron_mass == 1.0           # whole MLPs unless asked (docs/demo_search.md, section 5)
    assert RunSpec(mlp_neuron_mass=0.8).mlp_neuron_mass == 0.8
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="mlp_neuron_mass"):
            RunSpec(mlp_neuron_mass=bad)


@pytest.mark.parametrize("family,kv", [("gpt2", None), ("qwen2", 2)])
def test_grain_on_a_circuit_and_round_trip(family, kv, tok, recs, tmp_path):
    model = _model(family, kv, tok)
    circuit = with_neuron_grain(model, tok, recs, Circuit(list(EDGES)), mass=0.5, metric="logit_diff",
                                corruption="counterfactual", ig_steps=2)
    grain = circuit.metadata["neuron_grain"]
    assert set(circuit.neurons) == {"m0", "m1"} and all(circuit.neurons.values())
    masks = circuit_parameter_masks(model, circuit)
    assert grain["quantizable_fraction"] == pytest.approx(quantizable_fraction(model, masks))
    assert grain["quantizable_fraction"] < grain["quantizable_fraction_whole_mlp"]
    save_circuit(circuit, model, tmp_path)
    back, loaded = load_circuit(tmp_path)
    assert back.neurons == circuit.neurons and back.edges == circuit.edges
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[n], masks[n]) for n in masks)
    whole = with_neuron_grain(model, tok, recs, Circuit(list(EDGES)), mass=1.0, metric="logit_diff",
                              corruption="counterfactual")
    assert whole.neurons == {}
    assert whole.metadata["neuron_grain"]["quantizable_fraction"] == grain["quantizable_fraction_whole_mlp"]


def test_old_format_circuit_loads_as_whole_mlp(tok, tmp_path):
    """A circuit.json written before the neuron grain (no "neurons", no "node_neurons") owns its MLPs whole."""
    model = _model("llama", None, tok)
    save_circuit(Circuit(EDGES, neurons={"m1": [0, 3]}), model, tmp_path)
    path = tmp_path / "circuit.json"
    data = json.loads(path.read_text())
    old = {k: v for k, v in data.items() if k not in ("neurons", "node_neurons")}
    old["node_slices"]["m1"] = [[n, 0, 0, int(shape[0])] for n, shape in data["parameter_shapes"].items()
                                if n.startswith("model.layers.1.mlp.")]
    path.write_text(json.dumps(old))
    circuit, masks = load_circuit(tmp_path)
    assert circuit.neurons == {}
    assert all(bool(m.all()) for n, m in masks.items() if ".mlp." in n)
    assert masks.keys() == circuit_parameter_masks(model, circuit).keys()


def test_pipeline_records_the_grain_and_unlearns_only_kept_neurons(tmp_path, tmp_runs):
    """A tiny run at mass 0.5: metrics and circuit.json carry the fractions and kept neurons, and the unlearning's
    coordinates are exactly the neuron-grain masks' quantizable entries."""
    from mansu.io import read_json
    from mansu.models.loading import load_model
    from mansu.pipeline import RunSpec, run_pipeline, start_run
    from mansu.runs import layout
    from mansu.testing import write_tiny_world
    from mansu.unlearn.params import quantizable_names

    world = write_tiny_world(tmp_path / "world", hidden=128)    # its 0.8-faithful circuit holds m0 and m1
    unlearn = {"method": "mansu", "steps": 1, "batch_size": 4, "k": 2, "n_fisher": 4, "update_fraction": 0.01,
               "epsilon": 1e6}
    run = start_run(RunSpec(model=world["model"], forget=world["forget"], retain=world["retain"], unlearn=unlearn,
                            attribution_records=4, ig_steps=2, mlp_neuron_mass=0.5))
    run_pipeline(run)
    grain = read_json(run / layout.METRICS)["attribution"]["neuron_grain"]
    data = read_json(run / layout.CIRCUIT)
    assert {"m0", "m1"} <= set(data["nodes"]), "precondition: the tiny world's circuit has MLP nodes"
    assert set(data["neurons"]) == set(data["node_neurons"]) == {"m0", "m1"}
    assert grain["quantizable_fraction"] < grain["quantizable_fraction_whole_mlp"]
    _, masks = load_circuit(run)
    model = load_model(world["model"]).model
    quant = quantizable_names(model)
    owned = sum(int(masks[n].sum()) for n in quant if n in masks)
    assert owned == round(grain["quantizable_fraction"] * sum(dict(model.named_parameters())[n].numel()
                                                              for n in quant))
    assert read_json(run / layout.METRICS)["unlearn"]["n_coordinates"] == owned
