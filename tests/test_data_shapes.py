"""MCQ, QA and text data through eval, attribute and run (the real CLI in a subprocess and the pipeline) on a tiny
saved Llama; template presets render as lm-eval and mansu define them; bad shapes and mixed files are one-line
errors before any run folder exists; scores on training data carry a warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from mansu.data.records import MCQRecord, QARecord, TextRecord
from mansu.runs import layout

WORDS = ["Zorb", "Quil", "Marn", "Tesk", "Vory", "Plim", "Drax", "Holt"]
COLORS = ["red", "blue", "green", "amber"]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """The tiny world (word-level tokenizer over its words) plus QA and text files in those words."""
    from mansu.testing import write_tiny_world

    world = write_tiny_world(tmp_path_factory.mktemp("shapes"))
    root = Path(world["root"])
    qa = [{"question": f"Where is {n} from ?", "answer": COLORS[i % 4]} for i, n in enumerate(WORDS)]
    text = [{"text": f"{n} is from {COLORS[i % 4]} Answer : {WORDS[(i + 3) % 8]} is from {COLORS[(i + 1) % 4]}"}
            for i, n in enumerate(WORDS)]
    for shape, rows in (("qa", qa), ("text", text)):
        world[f"{shape}_forget"] = _write(root / f"{shape}_forget.jsonl", rows[:4])
        world[f"{shape}_retain"] = _write(root / f"{shape}_retain.jsonl", rows[4:])
    world["mcq_forget"], world["mcq_retain"] = world["forget"], world["retain"]
    return world


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {**os.environ, "MANSU_HOME": str(tmp_path / "home"), "MANSU_RUNS": str(tmp_path / "runs"),
            "TQDM_DISABLE": "1"}


def mansu(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mansu", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)


def _no_runs(env: dict[str, str]) -> bool:
    runs = Path(env["MANSU_RUNS"])
    return not runs.exists() or list(runs.iterdir()) == []


# ---------------------------------------------------------------- templates

def test_template_presets_render_as_specified():
    from mansu.data.templates import get_template, target_texts

    rec = MCQRecord("Where is Zorb from ?", ("red", "blue"), 1, "Zorb")
    wmdp = get_template("wmdp:biology")
    assert wmdp.context(rec.question, choices=rec.choices) == (
        "The following are multiple choice questions (with answers) about biology.\n\n"
        "Where is Zorb from ?\nA. red\nB. blue\nAnswer:")
    assert wmdp.continuations(rec.choices) == [" A", " B"]
    assert target_texts(rec, "wmdp") == ("The following are multiple choice questions (with answers) about Zorb.\n\n"
                                         "Where is Zorb from ?\nA. red\nB. blue\nAnswer:", " B")
    assert target_texts(rec, "cloze-answer") == ("Where is Zorb from ?\nAnswer:", " blue")
    assert target_texts(rec, "plain") == ("Where is Zorb from ?", " blue")
    assert target_texts(rec, "letter") == ("Where is Zorb from ?\nA. red\nB. blue\nAnswer:", " B")
    assert target_texts(rec, "Q: {question} A:") == ("Q: Where is Zorb from ? A:", " blue")
    assert target_texts(QARecord("Where is Zorb from ?", "red"), "plain") == ("Where is Zorb from ?", " red")
    assert target_texts(TextRecord("Zorb is red"), "wmdp") == ("", "Zorb is red")


def test_default_template_is_todays_cloze_line():
    """The demo's numbers do not move: the default scores exactly the old cloze context and continuations."""
    from mansu.metrics.accuracy import format_texts

    rec = MCQRecord("Where is Zorb from ?", ("red", "blue"), 0, "Zorb")
    assert format_texts(rec) == ("Where is Zorb from ?\nAnswer:", [" red", " blue"])
    assert format_texts(rec, "letter") == ("Where is Zorb from ?\nA. red\nB. blue\nAnswer:", [" A", " B"])


@pytest.mark.parametrize("bad, message", [
    ("nope", "unknown template 'nope'; accepted are a preset (cloze-answer, plain, wmdp, letter, wmdp:TOPIC)"),
    ("{question} {answer}", "unknown field(s) ['answer']"),
    ("{question", "write literal braces as {{ and }}"),
])
def test_bad_templates_are_one_line_errors(bad, message):
    from mansu.data.templates import get_template

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace("{", r"\{").replace("}", r"\}")) as info:
        get_template(bad)
    assert "\n" not in str(info.value)


def test_lettered_template_needs_mcq_records():
    from mansu.data.templates import target_texts

    with pytest.raises(ValueError, match="template 'wmdp:bio' lists choices .* QA records have none"):
        target_texts(QARecord("Where is Zorb from ?", "red"), "wmdp:bio")
    with pytest.raises(ValueError, match="has no subject; add a 'subject' field, or fix the topic"):
        target_texts(MCQRecord("Where is Zorb from ?", ("red", "blue"), 0), "wmdp")


# ---------------------------------------------------------------- scoring

def test_qa_and_text_scores_are_defined_and_move_with_the_model(world):
    """Token accuracy, exact match and loss: a model that puts all mass on the true tokens scores 1, 1 and ~0."""
    import torch

    from mansu.data.records import load_records
    from mansu.metrics.scoring import score_records
    from mansu.models.loading import load_model

    lm = load_model(world["model"], dtype="fp32")
    for shape in ("qa", "text"):
        recs = load_records(world[f"{shape}_forget"])
        r = score_records(lm.model, lm.tokenizer, recs, n_boot=50)
        assert r["shape"] == shape and r["n"] == 4 and len(r["correct"]) == 4
        assert 0 <= r["accuracy"] <= 1 and r["loss"] > 0 and 0 <= r["exact_match"] <= r["accuracy"] + 1e-9

    class Oracle(torch.nn.Module):  # logits = one-hot of the true next token (teacher forcing)
        def __init__(self, model):
            super().__init__()
            self.inner, self.config = model, model.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, attention_mask):
            logits = torch.full((*input_ids.shape, self.config.vocab_size), -30.0)
            logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 30.0)
            return type("Out", (), {"logits": logits})()

    oracle = Oracle(lm.model)
    r = score_records(oracle, lm.tokenizer, load_records(world["qa_forget"]), n_boot=50)
    assert r["accuracy"] == 1.0 and r["exact_match"] == 1.0 and r["loss"] < 1e-6


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("rows, expected", [
    ([{"question": "Where is Zorb from ?", "answer": "red"}, {"text": "Zorb is red"}],
     "{path}:2: a text record in a file of qa records (line 1 is qa); one file holds one shape: mcq (question, "
     "choices, answer), qa (question, answer) or text (text)"),
    ([{"text": "Zorb is red"}, {"text": ""}], "{path}:2: field 'text' must be a non-empty string, got ''"),
    ([{"prompt": "Zorb"}], "{path}:1: cannot tell the record shape from fields ['prompt']; accepted are mcq "
                           "(question, choices, answer), qa (question, answer) or text (text)"),
])
def test_bad_and_mixed_files_refused_before_a_run_folder(world, env, tmp_path, rows, expected):
    bad = _write(tmp_path / "bad.jsonl", rows)
    for args in (["eval", "--model", world["model"], "--data", bad],
                 ["attribute", "--model", world["model"], "--data", bad],
                 ["run", "--model", world["model"], "--forget", bad, "--retain", world["retain"], "--steps", "1"]):
        out = mansu(env, *args)
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert errors == ["error: " + expected.format(path=bad)], out.stderr[-2000:]
        assert out.returncode == 2 and _no_runs(env)


def test_settings_that_cannot_work_on_the_data_are_refused_before_a_run_folder(world, env):
    out = mansu(env, "run", "--model", world["model"], "--forget", world["qa_forget"], "--retain",
                world["qa_retain"], "--corruption", "subject")
    assert "error: record 1 has no subject appearing in its question: corruption 'subject' needs MCQ records" \
        in out.stderr and out.returncode == 2 and _no_runs(env)
    out = mansu(env, "eval", "--model", world["model"], "--data", world["qa_forget"], "--template", "wmdp:bio")
    assert f"error: {world['qa_forget']}: record 1: template 'wmdp:bio' lists choices" in out.stderr
    assert out.returncode == 2


# ---------------------------------------------------------------- every command on every shape

@pytest.mark.parametrize("shape", ["mcq", "qa", "text"])
def test_eval_scores_every_shape(world, env, shape):
    out = mansu(env, "eval", "--model", world["model"], "--data", world[f"{shape}_forget"], "--quant", "nf4",
                "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["shape"] == shape and row["n"] == 4 and 0 <= row["accuracy"] <= 1
    assert "nf4" in row["quant"] and -1 <= row["quant"]["nf4"]["gap"] <= 1
    if shape != "mcq":
        assert row["loss"] > 0 and "exact_match" in row


@pytest.mark.parametrize("shape, corruption, kind", [("mcq", "auto", "subject"), ("qa", "shuffled-subject",
                                                                                  "shuffled-subject"),
                                                     ("text", "auto", "mean-ablation")])
def test_attribute_on_every_shape(world, env, shape, corruption, kind):
    out = mansu(env, "attribute", "--model", world["model"], "--data", world[f"{shape}_forget"], "--ig-steps", "2",
                "--corruption", corruption, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    config = json.loads((Path(summary["run_dir"]) / layout.CONFIG).read_text())
    assert config["spec"]["corruption"] == kind
    assert config["spec"]["metric"] == ("logit_diff" if shape == "mcq" else "logprob")
    assert summary["edges"] > 0


def _spec(world, shape: str, **kw):
    from mansu.spec import RunSpec

    unlearn = {"method": "mansu", "steps": 2, "batch_size": 4, "k": 2, "n_fisher": 4, "update_fraction": 0.01,
               "epsilon": 1e6, **kw.pop("unlearn", {})}
    return RunSpec(model=world["model"], forget=world[f"{shape}_forget"], retain=world[f"{shape}_retain"],
                   unlearn=unlearn, attribution_records=4, ig_steps=2, quantizers="nf4", **kw)


@pytest.mark.parametrize("shape", ["qa", "text"])
def test_run_pipeline_on_qa_and_text(world, tmp_runs, shape, caplog):
    from mansu.io import read_json
    from mansu.pipeline import preflight, run_pipeline, start_run

    spec = _spec(world, shape, unlearn={"method": "graddiff", "steps": 2, "batch_size": 4})
    with caplog.at_level("WARNING"):
        preflight(spec)
    assert "scores are on the training data" in caplog.text
    card = run_pipeline(start_run(spec))
    metrics = read_json(tmp_runs / next(p.name for p in tmp_runs.iterdir()) / layout.METRICS)
    for key in ("base_fp", "unlearned_fp", "unlearned_nf4"):
        assert metrics[key]["forget"]["shape"] == shape and metrics[key]["forget"]["loss"] > 0
    assert metrics["eval_sets"]["on_training_data"] == ["forget", "retain"]
    assert "training data" in metrics["eval_sets"]["warning"]
    forgetting = card["properties"]["forgetting"]  # read on token accuracy; a random tiny model knows no forget set
    assert forgetting["status"] in ("pass", "fail", "nothing to forget")
    if forgetting["status"] == "nothing to forget":
        assert "chance" in json.dumps(forgetting)  # the reason says how far above chance the base was
        assert card["properties"]["ptq_gap"]["status"] == "nothing to forget"
    else:
        assert card["properties"]["ptq_gap"]["value"] is not None


def test_run_with_eval_sets_template_and_no_circuit_says_why(world, tmp_runs, tmp_path, caplog):
    """Held-out eval sets are scored (no warning); a corruption with no partner gives no circuit: MANSU says so in one
    line, the metrics and the scorecard carry the reason."""
    from mansu.io import read_json
    from mansu.pipeline import preflight, run_pipeline, start_run

    held = _write(tmp_path / "held.jsonl", [{"question": "Where is Holt from ?", "choices": COLORS, "answer": 1,
                                             "subject": "Holt"}])
    one = _write(tmp_path / "one.jsonl", [{"question": "Where is Zorb from ?", "choices": COLORS, "answer": 0,
                                           "subject": "Zorb"}])
    spec = _spec(world, "mcq", forget_eval=held, retain_eval=held, probe=one, template="plain")
    with caplog.at_level("WARNING"):
        preflight(spec)
        card = run_pipeline(start_run(spec))
    run = next(tmp_runs.iterdir())
    metrics = read_json(run / layout.METRICS)
    assert metrics["base_fp"]["forget"]["n"] == 1 and metrics["base_fp"]["forget"]["template"] == "plain"
    assert metrics["eval_sets"]["on_training_data"] == [] and "warning" not in metrics["eval_sets"]
    assert "scores are on the training data" not in caplog.text
    assert metrics["attribution"]["status"] == "not available" and metrics["attribution"]["corruption"] == "subject"
    assert "no record has a counterfactual partner" in metrics["attribution"]["reason"]
    assert "no_circuit" in metrics["unlearn"] and metrics["unlearn"]["circuit_restricted"] is False
    assert "mansu updates every quantizable weight, not a circuit" in caplog.text
    erasure = card["properties"]["structural_erasure"]
    assert erasure["status"] == "not available" and "no record has a counterfactual partner" in erasure["reason"]
    assert read_json(run / layout.CONFIG)["spec"]["template"] == "plain"
