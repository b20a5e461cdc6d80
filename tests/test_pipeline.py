"""The run pipeline on a tiny saved Llama: artifacts of every stage, resume, faults, CLI, --from-run, device_map."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mansu.runs import layout


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from mansu.testing import write_tiny_world

    return write_tiny_world(tmp_path_factory.mktemp("tiny_world"))


def _spec(world, **kw):
    from mansu.pipeline import RunSpec

    unlearn = {"method": "mansu", "steps": 2, "batch_size": 4, "k": 2, "n_fisher": 4, "update_fraction": 0.01,
               "epsilon": 1e6, **kw.pop("unlearn", {})}
    return RunSpec(model=world["model"], forget=world["forget"], retain=world["retain"], unlearn=unlearn,
                   attribution_records=4, ig_steps=2, **kw)


def _digest(folder: str) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(folder).glob("*.safetensors")))).hexdigest()


def test_full_pipeline_writes_every_artifact(tiny_world, tmp_runs):
    from mansu.io import read_json, read_safetensors
    from mansu.pipeline import STAGES, run_pipeline, start_run
    from mansu.runs.store import read_status
    from mansu.unlearn.floor import preview_floor

    before = _digest(tiny_world["model"])
    run = start_run(_spec(tiny_world, base_alignment="nf4-grid"))
    card = run_pipeline(run)
    assert read_json(run / layout.STAGES)["finished"] == list(STAGES)
    assert read_status(run)["state"] == "finished"
    assert set(card["properties"]) == {"forgetting", "retain", "ptq_gap", "structural_erasure"}
    metrics = read_json(run / layout.METRICS)
    for key in ("base_fp", "base_nf4", "unlearned_fp", "unlearned_nf4", "ptq_gap", "unlearn", "survival"):
        assert key in metrics, key
    assert metrics["base_alignment"]["frac_on_grid"] > 0.99          # nf4-grid base really sits on the grid
    steps = [json.loads(line) for line in (run / layout.STEPS).read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1] and all("n_floored" in s for s in steps)
    for stage in ("before", "after_fp", "after_nf4"):
        assert layout.attribution_json(run, stage).is_file()
    cad = read_json(run / layout.CAD)
    assert 0 <= cad["after_nf4"]["value"] <= 1
    parts = cad["after_nf4"]["parts"]                                 # the CAD split, stored beside CAD
    assert parts["cad"]["value"] == pytest.approx(cad["after_nf4"]["value"])
    split = sum(parts[p]["value"] for p in ("shrinkage", "reversal", "rerouting"))
    assert split == pytest.approx(parts["cad"]["value"])
    assert metrics["base_fp"]["forget"]["chance"] == pytest.approx(0.25)   # the tiny world's 4 choices
    assert read_json(run / layout.SURVIVAL)["overall"]["n_updated"] == metrics["unlearn"]["n_params_touched"]
    preview = preview_floor(read_safetensors(run / layout.UPDATE), kappa=1.0)
    assert preview.n_updated >= metrics["unlearn"]["n_params_touched"] > 0
    assert _digest(tiny_world["model"]) == before                     # the original on disk is untouched
    assert not (run / layout.MODEL_DIR).exists()                      # by default only the sparse update is saved
    assert (run / layout.MODEL_UPDATE).stat().st_size < (run / layout.UPDATE).stat().st_size + 4096


def test_killed_run_resumes_from_last_finished_stage(tiny_world, tmp_runs):
    from mansu.io import read_json
    from mansu.pipeline import run_pipeline, start_run

    run = start_run(_spec(tiny_world, attribution=False))
    run_pipeline(run, stop_after="unlearn")                            # as if killed right after unlearning
    stamp = (run / layout.STEPS).stat().st_mtime_ns
    assert read_json(run / layout.STAGES)["finished"][-1] == "unlearn"
    card = run_pipeline(run)
    assert (run / layout.STEPS).stat().st_mtime_ns == stamp              # unlearning was not repeated
    assert card["properties"]["structural_erasure"]["status"] == "not available"
    assert read_json(run / layout.CIRCUIT)["status"] == "not available"


def test_nan_loss_marks_run_failed_and_keeps_artifacts(tiny_world, tmp_runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mansu.io import read_json
    from mansu.pipeline import RunFailed, run_pipeline, start_run
    from mansu.runs.store import read_status

    model = AutoModelForCausalLM.from_pretrained(tiny_world["model"])
    with torch.no_grad():
        model.lm_head.weight[0].fill_(3e38)  # test setup: finite weights (loading accepts them) whose logits overflow
    model.save_pretrained(tmp_path / "bad")
    AutoTokenizer.from_pretrained(tiny_world["model"]).save_pretrained(tmp_path / "bad")
    spec = _spec({**tiny_world, "model": str(tmp_path / "bad")}, attribution=False, unlearn={"method": "graddiff"})
    run = start_run(spec)
    with pytest.raises(RunFailed, match="non-finite loss .* step 0"):
        run_pipeline(run)
    status = read_status(run)
    assert status["state"] == "failed" and status["failed_step"] == 0 and status["stage"] == "unlearn"
    assert "base_fp" in read_json(run / layout.METRICS)                  # earlier artifacts kept


def test_cli_rejects_bad_settings_before_any_work(tiny_world, tmp_runs, capsys):
    from mansu.cli import main

    argv = ["run", "--model", tiny_world["model"], "--forget", tiny_world["forget"], "--retain", tiny_world["retain"]]
    assert main(argv + ["--kappa", "0"]) == 2
    assert "kappa must be a number in (0.0, 16.0]" in capsys.readouterr().err
    assert main(argv + ["--method", "magic"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'magic'" in err and "'mansu'" in err and len(err.strip().splitlines()) == 1
    assert main(argv[:3] + ["--forget", "/nonexistent.jsonl", "--retain", tiny_world["retain"]]) == 2
    assert not tmp_runs.exists() or not any(tmp_runs.iterdir())        # no run folder was created


def test_cli_run_and_from_run_with_new_kappa(tiny_world, tmp_runs, capsys):
    from mansu.cli import main
    from mansu.io import read_json
    from mansu.runs.store import list_runs

    argv = ["run", "--model", tiny_world["model"], "--forget", tiny_world["forget"], "--retain", tiny_world["retain"],
            "--steps", "1", "--k", "2", "--n-fisher", "4", "--epsilon", "1e6", "--no-attribution", "--json"]
    assert main(argv) == 0
    parent = list_runs()[0]
    assert main(["run", "--from-run", parent.run_id, "--kappa", "2.0", "--json"]) == 0
    child = [r for r in list_runs() if r.run_id != parent.run_id][0]
    assert child.config["spec"]["unlearn"]["kappa"] == 2.0 and child.config["spec"]["parent_run"] == parent.run_id
    assert read_json(child.path / layout.STAGES)["seconds"]["base_eval"] == 0.0   # reused, not recomputed
    assert child.metrics["base_fp"] == parent.metrics["base_fp"]


def test_device_map_auto_path_on_cpu(tiny_world):
    """accelerate's device_map="auto" (the multi-GPU path) loads and unlearns; on a CPU-only box all goes to cpu."""
    from mansu.data.records import load_records
    from mansu.models.loading import load_model
    from mansu.unlearn.config import UnlearnConfig
    from mansu.unlearn.data import encode_records
    from mansu.unlearn.engine import run_unlearning

    lm = load_model(tiny_world["model"], device="auto")
    devices = {p.device.type for p in lm.model.parameters()}
    assert devices == {"cpu"}                                     # accelerate placed everything on the only device
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    f = encode_records(lm.tokenizer, load_records(tiny_world["forget"], "mcq"))
    r = encode_records(lm.tokenizer, load_records(tiny_world["retain"], "mcq"))
    res = run_unlearning(lm.model, f, r, UnlearnConfig(method="mansu", steps=1, k=2, n_fisher=4, epsilon=1e6,
                                                       update_fraction=0.01))
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in lm.model.named_parameters())
    assert changed == res.summary["n_params_touched"] > 0
