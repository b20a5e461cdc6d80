"""`mansu attack`: relearning attacks on a real run of a tiny Llama world (made with `mansu run`), their curves, the
certificate, and one-line errors before anything is written."""

from __future__ import annotations

import json

import pytest

from mansu.attack.relearn import CERTIFICATE, KINDS, attack_file, recovered_fraction
from mansu.cli import main

STEPS, EVERY = 6, 2
FAST = ["--steps", str(STEPS), "--eval-every", str(EVERY), "--records", "4", "--batch-size", "4"]


@pytest.fixture(scope="module")
def world_run(tmp_path_factory, one_torch_thread):
    """A finished MANSU run on the tiny world (run through the CLI), its runs root and world."""
    from mansu.testing import write_tiny_world

    root = tmp_path_factory.mktemp("attack")
    world = write_tiny_world(root / "world")
    mp = pytest.MonkeyPatch()
    mp.setenv("MANSU_RUNS", str(root / "runs"))
    code = main(["run", "--model", world["model"], "--forget", world["forget"], "--retain", world["retain"],
                 "--method", "graddiff", "--steps", "2", "--batch-size", "4", "--no-attribution",
                 "--quantizers", "nf4"])
    assert code == 0
    run = next((root / "runs").iterdir())
    yield run, world
    mp.undo()


@pytest.fixture
def runs_env(world_run, monkeypatch):
    monkeypatch.setenv("MANSU_RUNS", str(world_run[0].parent))
    return world_run


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_writes_a_curve_of_the_right_length(runs_env, kind):
    run, _ = runs_env
    assert main(["attack", run.name, "--kind", kind, *FAST]) == 0
    data = json.loads(attack_file(run, kind).read_text())
    assert [p["step"] for p in data["curve"]] == list(range(0, STEPS + 1, EVERY))
    assert all(0.0 <= p["forget"] <= 1.0 and 0.0 <= p["retain"] <= 1.0 for p in data["curve"])
    assert set(data["summary"]) == ({"nf4"} if kind == "quantize-relearn" else {"fp", "nf4"})
    assert data["precision"] == ("nf4" if kind == "quantize-relearn" else "fp")


def test_step_zero_is_the_unlearned_model(runs_env):
    """The rebuilt model at step 0 scores what the run's eval stage scored (same records, same scoring)."""
    from mansu.runs.store import read_metrics

    run, _ = runs_env
    assert main(["attack", run.name, "--kind", "relearn", *FAST]) == 0
    data = json.loads(attack_file(run, "relearn").read_text())
    metrics = read_metrics(run)
    assert data["curve"][0]["forget"] == pytest.approx(metrics["unlearned_fp"]["forget"]["accuracy"])
    assert data["curve"][0]["retain"] == pytest.approx(metrics["unlearned_fp"]["retain"]["accuracy"])


@pytest.mark.parametrize("kind", ["relearn", "quantize-relearn"])
def test_relearning_on_forget_records_raises_forget_accuracy(runs_env, kind):
    """Fine-tuning on the 4 forget records (fp, or a LoRA on the frozen NF4 twin) teaches their answers: forget
    accuracy climbs from the unlearned value to all 4 right."""
    run, _ = runs_env
    lr = ["--lr", "3e-3"] if kind == "relearn" else ["--lora-lr", "1e-2"]
    assert main(["attack", run.name, "--kind", kind, "--steps", "30", "--eval-every", "10", "--records", "4",
                 "--batch-size", "4", *lr]) == 0
    curve = json.loads(attack_file(run, kind).read_text())["curve"]
    assert curve[0]["forget"] < 1.0
    assert curve[-1]["forget"] == 1.0
    assert curve[-1]["forget"] > curve[0]["forget"]


def test_all_writes_the_certificate(runs_env):
    run, _ = runs_env
    assert main(["attack", run.name, "--kind", "all", *FAST]) == 0
    cert = json.loads((run / CERTIFICATE).read_text())
    assert set(cert["attacks"]) == set(KINDS)
    assert set(cert["attacks"]["relearn"]) == {"fp", "nf4"}
    assert set(cert["attacks"]["quantize-relearn"]) == {"nf4"}


def test_recovered_fraction_and_its_interval():
    base, unlearned = [1.0] * 10, [0.0] * 10
    attacked = [1.0] * 5 + [0.0] * 5
    out = recovered_fraction(base, unlearned, attacked)
    assert out["recovered"] == pytest.approx(0.5)
    assert out["ci_low"] < 0.5 < out["ci_high"]
    assert recovered_fraction(base, base, base)["recovered"] is None  # nothing forgotten: nothing to recover


@pytest.mark.parametrize("args,message", [
    (["20990101-000000-nope", "--kind", "relearn"], "not found"),
    (["RUN", "--kind", "jog"], "unknown attack kind 'jog'"),
    (["RUN", "--kind", "relearn", "--steps", "0"], "steps"),
    (["RUN", "--kind", "relearn-unrelated", "--unrelated", "/nonexistent.jsonl"], "file not found"),
])
def test_bad_input_is_one_line_and_writes_nothing(runs_env, capsys, args, message):
    run, _ = runs_env
    before = sorted(p.name for p in run.iterdir())
    args = [run.name if a == "RUN" else a for a in args]
    assert main(["attack", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_run_without_an_update_is_refused(runs_env, tmp_path, monkeypatch, capsys):
    import shutil

    run, _ = runs_env
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    (copy / "model_update.safetensors").unlink()
    monkeypatch.setenv("MANSU_RUNS", str(copy.parent))
    before = sorted(p.name for p in copy.iterdir())
    assert main(["attack", run.name, "--kind", "relearn"]) == 2
    assert "no model_update.safetensors" in capsys.readouterr().err
    assert sorted(p.name for p in copy.iterdir()) == before


def test_curves_reach_the_app_figure_and_the_reviewer_report(runs_env):
    from mansu.attack.relearn import read_attacks
    from mansu.runs.store import load_run
    from mansu.viz.attack import attack_curves_figure, recovered_rows
    from mansu.viz.reviewer import reviewer_report

    run, _ = runs_env
    assert main(["attack", run.name, "--kind", "relearn", *FAST]) == 0
    attacks = read_attacks(run)
    fig = attack_curves_figure(attacks)
    forget = [t for t in fig.data if t.name.startswith("forget: relearn (fp)")]
    assert list(forget[0].x) == list(range(0, STEPS + 1, EVERY))
    assert {r["precision"] for r in recovered_rows(attacks) if r["attack"] == "relearn"} == {"fp", "nf4"}
    assert "relearning attacks" in reviewer_report([load_run(run.name, run.parent)])
    assert attack_curves_figure({}) is None


def test_runs_page_shows_the_attack_curves(runs_env, tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    run, _ = runs_env
    assert main(["attack", run.name, "--kind", "relearn", *FAST]) == 0
    shutil.copytree(run, tmp_path / "runs" / run.name)
    monkeypatch.setenv("MANSU_HOME", str(tmp_path))
    monkeypatch.setenv("MANSU_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("views/runs.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Relearning attacks" in m.value for m in at.markdown)
    assert any(r["attack"] == "relearn" for r in at.dataframe[-1].value.to_dict("records"))


def test_lora_on_the_nf4_twin_trains_only_the_adapter():
    """QLoRA as quantize-relearn runs it: inside the twin + adapter block the model starts as its NF4 twin (B = 0),
    one step moves only the adapter, and on exit the model's own weights and output are as before."""
    import torch

    from mansu.attack.lora import lora
    from mansu.quant.twin import quantized
    from mansu.testing import tiny_llama

    model = tiny_llama(vocab_size=40, hidden=64)
    x = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    fp = model(input_ids=x).logits.detach()
    with quantized(model, "nf4") as twin:
        nf4 = twin.model(input_ids=x).logits.detach()
    with quantized(model, "nf4"), lora(model, rank=4) as adapters:
        assert torch.equal(model(input_ids=x).logits, nf4)
        assert not any(p.requires_grad for p in model.parameters())
        loss = model(input_ids=x).logits.logsumexp(-1).mean()
        loss.backward()
        torch.optim.SGD(adapters, lr=0.1).step()
        assert not torch.allclose(model(input_ids=x).logits, nf4)
    assert all(torch.equal(p, weights[n]) and p.requires_grad for n, p in model.named_parameters())
    assert torch.equal(model(input_ids=x).logits, fp)
