"""mansu.advice: a run that misses says which flag to turn and which way, and following the advice helps.  End to end
on a tiny Llama trained to recite its forget lines: GradDiff at a learning rate far too small for it forgets nothing,
the run prints and stores the advice (a larger --lr), and the run at the advised settings forgets more."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from mansu.runs import layout

WORDS = "Zorb Quil Marn Tesk Vory Plim Drax Holt red blue green amber violet grey".split()


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama that recites 4 forget lines and 4 retain lines (random 12-word lines)."""
    from mansu.models.demo import build_tokenizer
    from mansu.testing import TINY_WORDS, tiny_llama

    root = tmp_path_factory.mktemp("advice")
    tok = build_tokenizer([TINY_WORDS])
    model = tiny_llama(vocab_size=len(tok), layers=2, hidden=64, heads=4)
    model.config.pad_token_id = tok.pad_token_id
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(8)]
    ids = torch.tensor([tok(t)["input_ids"] for t in lines])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(80):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.save_pretrained(root / "model", safe_serialization=True)
    tok.save_pretrained(root / "model")
    paths = {"model": str(root / "model")}
    for name, part in (("forget", lines[:4]), ("retain", lines[4:])):
        paths[name] = str(root / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return paths


def _run(capsys, memorised, *flags: str) -> tuple[str, dict]:
    from mansu.cli import main

    capsys.readouterr()
    assert main(["run", "--model", memorised["model"], "--forget", memorised["forget"], "--retain",
                 memorised["retain"], "--method", "graddiff", "--no-attribution", "--quantizers", "nf4",
                 "--batch-size", "4", *flags]) == 0
    out = capsys.readouterr().out
    run = Path(out.split("run ", 1)[1].split()[0])
    from mansu.runs.store import run_dir

    return out, json.loads((run_dir(run.name) / layout.METRICS).read_text())


def test_a_run_too_weak_for_the_model_says_which_flag_and_the_advice_helps(memorised, tmp_runs, capsys):
    out, metrics = _run(capsys, memorised, "--lr", "1e-6", "--steps", "2")
    advice = metrics["advice"]
    assert metrics["base_fp"]["forget"]["rouge_l_recall"] > 0.9  # the model knows its forget lines
    assert advice["kind"] == "too weak" and advice["flags"] == {"lr": 3e-6, "steps": 4}
    assert f"next step: {advice['line']}" in out and "--lr 3e-06 (now 1e-06)" in advice["line"]
    # following the advice's direction (here further: 1000x the lr) makes the same run forget
    _, stronger = _run(capsys, memorised, "--lr", "3e-3", "--steps", "4")
    before = metrics["unlearned_fp"]["forget"]["rouge_l_recall"]
    assert stronger["unlearned_fp"]["forget"]["rouge_l_recall"] < before - 0.3
    assert stronger["advice"]["kind"] != "too weak"


@pytest.mark.parametrize("method, kind, flags", [
    ("mansu", "too weak", {"update_fraction": 0.008, "steps": 16}),
    ("ssd", "too weak", {"ssd_alpha": 5.0, "steps": 16}),
    ("graddiff", "retain damaged", {"lr": 1e-05, "steps": 4}),
    ("npo", "undone by NF4", {"method": "mansu"}),
    ("mansu", "undone by NF4", {"kappa": 2.0}),
])
def test_advice_rule_per_method_and_failure(method, kind, flags):
    from mansu.advice import advise
    from mansu.unlearn.config import UnlearnConfig

    status = {"too weak": ("fail", "pass", "pass"), "retain damaged": ("pass", "fail", "pass"),
              "undone by NF4": ("pass", "pass", "fail")}[kind]
    card = {"properties": {name: {"status": s, "value": 0.1, "threshold": 0.2, "metric": "accuracy"}
                           for name, s in zip(("forgetting", "retain", "ptq_gap"), status)}}
    unlearn = UnlearnConfig(method=method, steps=8, lr=3e-5).to_dict()
    advice = advise(card, unlearn)
    assert advice.kind == kind and advice.flags == flags
    assert advise({**card, "nothing_to_forget": True}, unlearn) is None
    passing = {"properties": {n: {"status": "pass"} for n in ("forgetting", "retain", "ptq_gap")}}
    assert advise(passing, unlearn) is None
