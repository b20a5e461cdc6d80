"""Localisation at a fixed budget (mansu.attribution.localisation) on tiny random models: every mask has the
circuit's coordinate count, the fact-lookup rule ranks layers by their traced effect (a silenced MLP has none),
saliency picks the top coordinates of an explicit autograd computation, and a bad choice fails before any run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from mansu.attribution.data import prepare_prompts
from mansu.attribution.localisation import LOCALISATIONS, budget, localise, saliency_masks, trace_mlps
from mansu.testing import tiny_model, toy_records, toy_tokenizer
from mansu.unlearn.data import encode_records
from mansu.unlearn.objectives import nll_loss
from mansu.unlearn.params import quantizable_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def _inputs(tok, layers: int = 2, family: str = "llama"):
    model = tiny_model(family, vocab_size=len(tok), layers=layers)
    recs = toy_records(8)
    prompts = prepare_prompts(tok, recs, kind="subject")
    return model, prompts, encode_records(tok, recs[:6]), encode_records(tok, recs[6:] + toy_records(4, seed=1))


def _circuit_masks(model) -> dict[str, torch.Tensor]:
    """A hand-made 'circuit': the first attention weight whole and a third of the last quantizable weight."""
    params, names = dict(model.named_parameters()), quantizable_names(model)
    last = torch.zeros(params[names[-1]].shape, dtype=torch.bool)
    last.view(-1)[: last.numel() // 3] = True
    return {names[0]: torch.ones(params[names[0]].shape, dtype=torch.bool), names[-1]: last}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_mask_has_the_circuits_size(family, tok):
    model, prompts, forget, retain = _inputs(tok, family=family)
    circuit = _circuit_masks(model)
    n = budget(model, circuit)
    masks = {}
    for choice in LOCALISATIONS:
        out = localise(choice, model, circuit, tokenizer=tok, prompts=prompts.prompts, metric=prompts.metric,
                       corruption=prompts.corruption, forget=forget, retain=retain, seed=3)
        masks[choice] = out.masks
        assert out.info["n_coordinates"] == budget(model, out.masks) == n
    assert all(".mlp." in name for name in masks["fact_mlp"])
    assert len(masks["random"]) > 2  # spread over the weights, unlike the circuit's two
    again = localise("random", model, circuit, seed=3).masks
    assert all(torch.equal(again[k], masks["random"][k]) for k in masks["random"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_random_masks_per_tensor_past_the_direct_limit(family, tok, monkeypatch):
    # past RANDOM_DIRECT coordinates (an 8B model) the draw goes tensor by tensor: still exactly n coordinates,
    # seeded, spread over the tensors in proportion to their sizes
    import mansu.attribution.localisation as loc

    model = _inputs(tok, family=family)[0]
    params, names = dict(model.named_parameters()), quantizable_names(model)
    total = sum(params[name].numel() for name in names)
    monkeypatch.setattr(loc, "RANDOM_DIRECT", 0)
    masks = loc.random_masks(model, total // 2, seed=5)
    assert budget(model, masks) == total // 2 and set(masks) <= set(names)
    assert all(m.shape == params[name].shape for name, m in masks.items())
    again = loc.random_masks(model, total // 2, seed=5)
    assert masks.keys() == again.keys() and all(torch.equal(masks[k], again[k]) for k in masks)
    assert any(not torch.equal(masks[k], v) for k, v in loc.random_masks(model, total // 2, seed=6).items()
               if k in masks)
    for name in names:                                   # each tensor holds about half of its weights
        share = int(masks[name].sum()) / params[name].numel() if name in masks else 0.0
        assert abs(share - 0.5) < 0.2, (name, share)


def test_fact_rule_ranks_traced_effects_and_silenced_mlps_have_none(tok):
    model, prompts, _, _ = _inputs(tok, layers=3)
    with torch.no_grad():  # silence m0 and m2: restoring their (zero) output changes nothing
        for layer in (0, 2):
            model.model.layers[layer].mlp.down_proj.weight.zero_()
    trace = trace_mlps(model, tok, prompts.prompts, metric=prompts.metric, corruption=prompts.corruption)
    assert trace["effects"][0] == 0 and trace["effects"][2] == 0 and trace["effects"][1] != 0
    assert trace["order"] == sorted(range(3), key=lambda i: (-trace["effects"][i], i))  # ties: the lower layer
    assert trace["order"].index(0) < trace["order"].index(2)
    assert trace == trace_mlps(model, tok, prompts.prompts, metric=prompts.metric, corruption=prompts.corruption)


def test_fact_mlp_fills_the_top_layer_by_neuron_gradient(tok):
    model, prompts, forget, retain = _inputs(tok)
    circuit = _circuit_masks(model)
    out = localise("fact_mlp", model, circuit, tokenizer=tok, prompts=prompts.prompts, metric=prompts.metric,
                   corruption=prompts.corruption, forget=forget, retain=retain)
    top = out.info["trace"]["order"][0]
    assert out.info["layers"][0] == top
    assert all(f"layers.{top}.mlp." in name for name in out.masks)  # the budget fits in one MLP
    rows = out.masks[f"model.layers.{top}.mlp.gate_proj.weight"].all(1)  # whole neurons own their gate rows
    model.zero_grad()
    nll_loss(model, forget).backward()
    mlp = model.model.layers[top].mlp
    score = (mlp.gate_proj.weight.grad.abs().sum(1) + mlp.up_proj.weight.grad.abs().sum(1)
             + mlp.down_proj.weight.grad.abs().sum(0))
    whole = int(rows.sum())
    assert whole > 0 and set(torch.topk(score, whole).indices.tolist()) == set(torch.nonzero(rows)[:, 0].tolist())


def test_saliency_picks_the_top_scores_of_a_brute_force_computation(tok):
    model, _, forget, retain = _inputs(tok)
    params = dict(model.named_parameters())
    names = quantizable_names(model)
    model.zero_grad()
    nll_loss(model, forget).backward()
    grad = torch.cat([params[n].grad.reshape(-1) for n in names]).double()
    fisher = torch.zeros_like(grad)
    for i in range(len(retain)):  # n_fisher = every retain example: the draw order does not matter
        model.zero_grad()
        nll_loss(model, retain.select([i])).backward()
        fisher += torch.cat([params[n].grad.reshape(-1) for n in names]).double() ** 2
    fisher /= len(retain)
    score = grad.abs() / (fisher + 0.5 * fisher.mean())
    n = 300
    masks = saliency_masks(model, forget, retain, n, n_fisher=len(retain), damping=0.5, seed=0)
    picked = torch.cat([masks.get(name, torch.zeros(params[name].shape, dtype=torch.bool)).reshape(-1)
                        for name in names])
    ranked = torch.argsort(score, descending=True)
    assert int(picked.sum()) == n
    assert bool(picked[ranked[: n - 5]].all()) and not bool(picked[ranked[n + 5:]].any())  # fp32 vs fp64 near the cut


def test_a_bad_localisation_fails_in_one_line_before_any_run(tmp_path):
    from mansu.spec import demo_spec

    with pytest.raises(ValueError, match="accepted are circuit, random, fact_mlp, saliency"):
        demo_spec("mansu", localisation="everywhere")
    with pytest.raises(ValueError, match="replaces a circuit-restricted method's circuit"):
        demo_spec("graddiff", localisation="random")
    env = {**os.environ, "MANSU_RUNS": str(tmp_path / "runs")}
    out = subprocess.run([sys.executable, "-m", "mansu", "run", "--demo", "--localisation", "everywhere"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "localisation" in lines[0], out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags, message", [
    (["--localisations", "circuit,everywhere"], "--localisations everywhere: give some of circuit, random"),
    (["--seeds", "a"], "--seeds 'a' is not a comma-separated list of int values"),
    (["--mlp-neuron-mass", "0"], "--mlp-neuron-mass must be in (0, 1]"),
    (["--out", "page.txt"], "--out must be a markdown file ending in .md"),
    (["--page-only"], "--page-only writes the page from --merge's points"),
    (["--merge", "missing.json"], "missing.json"),
])
def test_bad_sweep_options_end_in_one_line_before_anything_is_written(flags, message, tmp_path, capsys, monkeypatch):
    from mansu.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "localisation", "--out", str(tmp_path / "l.md"), "--runs", str(tmp_path / "runs"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def _point(mask: str, seed: int, forgot: float, gap: float = 0.0, **passes):
    from mansu.science.localisation import LocalisationPoint

    ok = {"forgetting": forgot >= 0.5, "retain": True, "ptq_gap": gap <= 0.05, "structural_erasure": False, **passes}
    return LocalisationPoint(mask, seed, f"/nonexistent/{mask}-{seed}", 1000, 40 + seed, [1] if mask == "fact_mlp"
                             else None, None, 1.0, 1 - 0.75 * forgot, 1 - 0.75 * (forgot - gap), 1.0, 1.0, 1.0, 0.99,
                             forgot, 0.0, 0.0133, gap, (gap - 0.01, gap + 0.01), 0.4, (0.35, 0.45), ok, 10.0)


def test_the_page_states_the_table_and_the_verdict_by_its_rule(tmp_path):
    from mansu.science.localisation import LocalisationConfig
    from mansu.science.localisation_report import write_localisation_page

    forgot = {"circuit": (0.40, 0.45, 0.50), "random": (0.20, 0.22, 0.18), "fact_mlp": (0.41, 0.44, 0.52),
              "saliency": (0.80, 0.85, 0.90)}
    points = [_point(m, s, f) for m, fs in forgot.items() for s, f in enumerate(fs)]
    paths = write_localisation_page(points, LocalisationConfig(), tmp_path / "l.md", seconds=60.0, commands=["x"])
    page = paths[0].read_text()
    assert [p.suffix for p in paths] == [".md", ".json", ".png", ".svg"]
    assert "| EAP-IG circuit | 3 | 1,000 ± 0 |" in page and "| 1/3 | 3/3 | 3/3 | 0/3 |" in page
    assert "**random** forgets less after NF4 than the circuit" in page
    assert "**saliency** forgets more after NF4 than the circuit" in page
    assert "**fact-lookup MLP** is not resolved from the circuit" in page and "**cannot decide**" in page


def test_runs_of_every_localisation_move_the_same_budget_where_their_mask_says(tmp_path):
    from mansu.io import read_json
    from mansu.pipeline import BaseCache, RunSpec, run_pipeline, start_run
    from mansu.runs import layout
    from mansu.testing import write_tiny_world
    from mansu.unlearn.model_update import read_model_update

    world = write_tiny_world(tmp_path / "world")
    cache, info = BaseCache(), {}
    for choice in LOCALISATIONS:
        spec = RunSpec(model=world["model"], forget=world["forget"], retain=world["retain"], localisation=choice,
                       unlearn={"method": "mansu", "steps": 2, "batch_size": 4, "k": 2, "n_fisher": 4,
                                "update_fraction": 0.01}, attribution_records=4, ig_steps=2)
        run = start_run(spec, root=tmp_path / "runs")
        run_pipeline(run, cache, stop_after="unlearn")
        metrics = read_json(run / layout.METRICS)
        info[choice] = (metrics["localisation"]["n_coordinates"], metrics["unlearn"]["n_coordinates"])
        moved = read_model_update(run / layout.MODEL_UPDATE)[0]
        assert moved and (choice != "fact_mlp" or all(".mlp." in name for name in moved))
    assert len(set(info.values())) == 1 and info["circuit"][0] == info["circuit"][1] > 0
