"""Demo models per training seed: the same world beside each other, different weights; a run names its model seed
and records it; compare pairs model seed s with unlearning seed s; a bad seed is refused before anything exists."""

from __future__ import annotations

import argparse

import pytest

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, warmup_steps=2, epochs=2,
            target_accuracy=0.01)
WORLD_FILES = ("forget.jsonl", "retain.jsonl", "probe.jsonl", "corpus.jsonl", "world.json", "model/tokenizer.json")


def test_two_seeds_share_the_world_and_differ_in_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from mansu.data.demo_world import WorldConfig
    from mansu.models.demo import DemoModelConfig, demo_assets, demo_build_progress, ensure_demo

    monkeypatch.setenv("MANSU_HOME", str(tmp_path))
    world = WorldConfig(n_entities=10)
    built = {seed: ensure_demo(world_config=world, model_config=DemoModelConfig(**TINY, seed=seed), threads=1)
             for seed in (0, 1)}
    assert built[0].root == tmp_path / "demo" and built[1].root == tmp_path / "demo-seed1"   # seed 0 stays put
    assert built[1].root == demo_assets(model_seed=1).root
    for name in WORLD_FILES:
        assert (built[0].root / name).read_bytes() == (built[1].root / name).read_bytes(), name
    weights = [load_file(built[s].model_dir / "model.safetensors") for s in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    assert all(not weights[0][k].equal(weights[1][k]) for k in weights[0] if k.endswith("proj.weight"))
    assert demo_build_progress(model_seed=1)["stage"] == "done"          # each seed keeps its own build record


def test_a_demo_run_records_its_model_seed(tmp_path):
    from mansu.cli import build_parser
    from mansu.commands.run import build_specs
    from mansu.pipeline import start_run
    from mansu.runs.store import read_config
    from mansu.spec import RunSpec, run_label

    args = build_parser().parse_args(["run", "--demo", "--method", "graddiff", "--model-seed", "2"])
    (spec,) = build_specs(args)
    run = start_run(spec, root=tmp_path)
    config = read_config(run)
    assert config["spec"]["model_seed"] == 2 and RunSpec.from_dict(config["spec"]).model_seed == 2
    assert "-m2-s0" in run.name and "graddiff · nf4-grid · model 2 · s0" in run_label(run.name, config)
    (plain,) = build_specs(build_parser().parse_args(["run", "--demo"]))
    assert plain.model_seed == 0 and "model" not in run_label("20260101-120000-x", {"spec": plain.to_dict()})


def test_compare_pairs_model_and_unlearning_seeds():
    from mansu.commands.compare import plan

    args = argparse.Namespace(seeds=3, methods="mansu,graddiff", natural_methods="mansu", model_seeds="paired")
    jobs = plan(args)
    assert len(jobs) == 9 and {(seed, model) for _, _, seed, model in jobs} == {(0, 0), (1, 1), (2, 2)}
    assert jobs[:3] == [("nf4-grid", "mansu", 0, 0), ("nf4-grid", "graddiff", 0, 0), ("natural", "mansu", 0, 0)]
    same = plan(argparse.Namespace(**{**vars(args), "model_seeds": "same"}))
    assert {model for *_, model in same} == {0} and [j[:3] for j in same] == [j[:3] for j in jobs]


def test_compare_states_the_spread_and_each_models_base():
    from mansu.commands.compare import render

    args = argparse.Namespace(seeds=2, retain_eval_limit=10, attribution_records=4, ig_steps=2)
    row = {"run_id": "r", "method": "mansu", "seed": 0, "model_seed": 0, "base": "nf4-grid", "forget_fp": 0.5,
           "forget_nf4": 0.5, "ptq_gap": 0.0, "retain_fp": 0.9, "all_pass": True,
           "pass": {k: True for k in ("forgetting", "retain", "ptq_gap", "structural_erasure")}}
    base = {s: type("C", (), {"metrics": {"base_fp": {"forget": {"accuracy": a}, "retain": {"accuracy": 1.0}},
                                          "base_nf4": {"forget": {"accuracy": a}, "retain": {"accuracy": 0.99}}}})()
            for s, a in ((0, 1.0), (1, 0.975))}
    text = render([row, {**row, "seed": 1, "model_seed": 1}], {("nf4-grid", s): c for s, c in base.items()}, {},
                  60.0, args)
    assert "covers both the demo model's training seed and the unlearning seed" in text
    assert "Base model (demo model seed 0): forget fp 1.000" in text
    assert "Base model (demo model seed 1): forget fp 0.975, NF4 0.975; retain fp 1.000, NF4 0.990." in text
    alone = render([row], {("nf4-grid", 0): base[0]}, {}, 60.0, args)
    assert "spread covers the unlearning seed only" in alone and "demo model seed 1" not in alone


@pytest.mark.parametrize("argv", [["demo", "--model-seed", "-1"], ["run", "--demo", "--model-seed", "-1"],
                                  ["run", "--model", "m", "--forget", "f", "--retain", "r", "--model-seed", "1"]])
def test_a_bad_model_seed_is_refused_before_anything_is_created(argv, tmp_path, monkeypatch, capsys):
    from mansu.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("MANSU_HOME", str(home))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "model" in err[0] and "seed" in err[0]
    assert not home.exists()
