"""`mansu eval` on text and QA data reports what `run` records (ROUGE-L memorisation, loss/perplexity, Min-K% AUC
against a holdout) in full precision and under each quantizer, on a tiny Llama trained to memorise its forget lines."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama trained until it recites 4 random forget lines; 4 other random lines are the holdout."""
    from mansu.testing import random_lines, write_memorised_text

    rng = random.Random(0)
    forget, holdout = random_lines(rng, 4), random_lines(rng, 4)
    return write_memorised_text(tmp_path_factory.mktemp("eval_text"), {"forget": forget, "holdout": holdout},
                                ("forget",), steps=60)


def _eval(capsys, *argv: str) -> dict:
    from mansu.cli import main

    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_reports_text_metrics_in_fp_and_under_each_quantizer(memorised, capsys):
    row = _eval(capsys, "--model", memorised["model"], "--data", memorised["forget"], "--holdout",
                memorised["holdout"], "--quant", "nf4,int8")
    # the model recites its forget lines: verbatim recall near 1, the forget lines far more familiar than the holdout
    assert row["rouge_kind"] == "verbatim" and row["rouge_l_recall"] > 0.9
    assert row["mia"]["auc"] == 1.0 and row["mia"]["privleak"] == -100.0
    assert row["perplexity"] == pytest.approx(math.exp(row["loss"]))
    for q in ("nf4", "int8"):
        entry = row["quant"][q]
        assert entry["rouge_l"]["acc_full"] == pytest.approx(row["rouge_l_recall"])
        assert 0 <= entry["rouge_l"]["acc_nf4"] <= 1 and "auc" in entry["mia"]
        assert entry["loss"] != row["loss"] and entry["perplexity"] == pytest.approx(math.exp(entry["loss"]))
    # int8 is a finer grid than NF4: its loss stays closer to full precision
    assert abs(row["quant"]["int8"]["loss"] - row["loss"]) < abs(row["quant"]["nf4"]["loss"] - row["loss"])


def test_eval_text_metrics_equal_the_runs_and_holdout_shape_is_checked(memorised, capsys):
    from mansu.data.records import load_records
    from mansu.metrics.scoring import score_records
    from mansu.metrics.text import text_metrics
    from mansu.models.loading import load_model

    row = _eval(capsys, "--model", memorised["model"], "--data", memorised["holdout"])
    lm = load_model(memorised["model"])
    recs = load_records(memorised["holdout"])
    scores = score_records(lm.model, lm.tokenizer, recs)  # what pipeline._evaluate records for a split
    direct = text_metrics(lm.model, lm.tokenizer, recs, loss=scores["loss"])
    assert row["rouge_l_recall"] == pytest.approx(direct["rouge_l_recall"])
    assert row["rouge_l_recall"] < 0.9  # unseen random lines are not recited
    assert row["loss"] == pytest.approx(scores["loss"]) and "mia" not in row
    qa = Path(memorised["holdout"]).with_name("qa.jsonl")
    qa.write_text(json.dumps({"question": "Where is Zorb from ?", "answer": "red"}) + "\n")
    from mansu.cli import main

    capsys.readouterr()
    assert main(["eval", "--model", memorised["model"], "--data", str(qa), "--holdout", memorised["holdout"]]) == 2
    err = capsys.readouterr().err
    assert f"holds text records but {qa} holds qa records" in err and "Loading" not in err  # before the model loads
