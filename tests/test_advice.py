"""mansu.advice: a run that misses says which flag to turn and which way, and following the advice helps.  End to end
on a tiny Llama trained to recite its forget lines: GradDiff at a learning rate far too small for it forgets nothing,
the run prints and stores the advice (a larger --lr), and the run at the advised settings forgets more."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from mansu.runs import layout


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama that recites 4 forget lines and 4 retain lines (random 12-word lines)."""
    from mansu.testing import random_lines, write_memorised_text

    lines = random_lines(random.Random(1), 8)
    return write_memorised_text(tmp_path_factory.mktemp("advice"), {"forget": lines[:4], "retain": lines[4:]},
                                ("forget", "retain"), steps=80)


def _run(memorised, *flags: str) -> tuple[str, Path]:
    """`mansu run` (the CLI in this process) with GradDiff on the memorised lines; (stdout, run folder)."""
    import contextlib
    import io

    from mansu.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", "--model", memorised["model"], "--forget", memorised["forget"], "--retain",
                     memorised["retain"], "--method", "graddiff", "--no-attribution", "--quantizers", "nf4",
                     "--batch-size", "4", *flags]) == 0
    name = out.getvalue().split("run ", 1)[1].split()[0]
    return out.getvalue(), Path(memorised["runs"]) / name


@pytest.fixture(scope="module")
def runs(memorised, tmp_path_factory):
    """A run far too weak for the model (lr 1e-6, 2 steps) and one far stronger (lr 3e-3, 4 steps)."""
    memorised["runs"] = str(tmp_path_factory.mktemp("advice_runs"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MANSU_RUNS", memorised["runs"])
        yield {"weak": _run(memorised, "--lr", "1e-6", "--steps", "2"),
               "strong": _run(memorised, "--lr", "3e-3", "--steps", "4")}


def _metrics(run: Path) -> dict:
    return json.loads((run / layout.METRICS).read_text())


def test_a_run_too_weak_for_the_model_says_which_flag_and_the_advice_helps(runs):
    out, weak = runs["weak"]
    metrics = _metrics(weak)
    advice = metrics["advice"]
    assert metrics["base_fp"]["forget"]["rouge_l_recall"] > 0.9  # the model knows its forget lines
    assert advice["kind"] == "too weak" and advice["flags"] == {"lr": 3e-6, "steps": 4}
    assert f"next step: {advice['line']}" in out and "--lr 3e-06 (now 1e-06)" in advice["line"]
    # following the advice's direction (here further: 3000x the lr, 2x the steps) makes the same run forget
    stronger = _metrics(runs["strong"][1])
    before = metrics["unlearned_fp"]["forget"]["rouge_l_recall"]
    assert stronger["unlearned_fp"]["forget"]["rouge_l_recall"] < before - 0.3
    assert stronger["advice"]["kind"] != "too weak"


def test_before_after_page_and_compare_rows_show_the_text_metric(runs, monkeypatch, tmp_path):
    """The app's Before/after page on a text run: no exception, the advice and the ROUGE-L table per stage."""
    from streamlit.testing.v1 import AppTest

    from mansu.commands.compare import headline
    from mansu.metrics.text import text_table

    run = runs["strong"][1]
    metrics = _metrics(run)
    rows = {r["stage"]: r for r in text_table(metrics)}
    assert list(rows) == ["base fp", "base nf4", "unlearned fp", "unlearned nf4"]
    assert rows["unlearned nf4"]["forget verbatim ROUGE-L"] == metrics["unlearned_nf4"]["forget"]["rouge_l_recall"]
    assert headline(metrics["unlearned_fp"]["forget"]) == metrics["unlearned_fp"]["forget"]["rouge_l_recall"]
    only = tmp_path / "runs"  # the strong run alone: two tiny runs can share a creation second, so "newest" is
    shutil.copytree(run, only / run.name)  # not a safe way to pick it
    monkeypatch.setenv("MANSU_RUNS", str(only))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("views/before_after.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert metrics["advice"]["kind"] == "retain damaged"  # 3000x the lr: the retain lines went too
    assert [i.value for i in at.info if i.value.startswith("next step:")] == [f"next step: {metrics['advice']['line']}"]
    table = at.dataframe[0].value
    assert list(table["stage"]) == list(rows) and "forget verbatim ROUGE-L" in table.columns


@pytest.mark.parametrize("method, kind, flags", [
    ("mansu", "too weak", {"update_fraction": 0.008, "steps": 16}),
    ("ssd", "too weak", {"ssd_alpha": 5.0, "steps": 16}),
    ("graddiff", "retain damaged", {"lr": 1e-05, "steps": 4}),
    ("npo", "back under NF4", {"method": "mansu"}),
    ("mansu", "back under NF4", {"kappa": 2.0}),
])
def test_advice_rule_per_method_and_failure(method, kind, flags):
    from mansu.advice import advise
    from mansu.unlearn.config import UnlearnConfig

    status = {"too weak": ("fail", "pass", "pass"), "retain damaged": ("pass", "fail", "pass"),
              "back under NF4": ("pass", "pass", "fail")}[kind]
    card = {"properties": {name: {"status": s, "value": 0.1, "threshold": 0.2, "metric": "accuracy"}
                           for name, s in zip(("forgetting", "retain", "ptq_gap"), status)}}
    unlearn = UnlearnConfig(method=method, steps=8, lr=3e-5).to_dict()
    advice = advise(card, unlearn)
    assert advice.kind == kind and advice.flags == flags
    assert advise({**card, "nothing_to_forget": True}, unlearn) is None
    passing = {"properties": {n: {"status": "pass"} for n in ("forgetting", "retain", "ptq_gap")}}
    assert advise(passing, unlearn) is None
