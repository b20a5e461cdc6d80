"""Text/QA memorisation metrics (mansu.metrics.text) against the reference definitions on fixed cases: ROUGE-L
against the rouge_score package (MUSE's and TOFU's scorer), Min-K% and PrivLeak against open-unlearning's formulas,
greedy continuations against a one-token-at-a-time argmax loop."""

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from mansu.data.records import QARecord, TextRecord
from mansu.data.templates import get_template
from mansu.metrics.text import (
    greedy_continuations,
    lcs_length,
    membership_auc,
    min_k_score,
    privleak,
    prompt_and_reference,
    rouge_l,
    rouge_tokens,
    text_metrics,
)
from mansu.testing import NAMES, tiny_model, toy_tokenizer

CASES = [
    ("When shall we three meet again?", "When shall we three meet again?"),
    ("When shall we three meet again? In thunder, lightning, or in rain?", "when we meet in rain, thunder"),
    ("Fair is foul, and foul is fair:", "foul is fair and fair is foul"),
    ("The hurlyburly's done", "the hurly-burly is done!"),
    ("Caf\u00e9 na\u00efve r\u00e9sum\u00e9 2024", "cafe naive resume 2024"),
    ("Upon the heath.", ""),
    ("...", "words without a match"),
    ("a b c d e f g", "g f e d c b a"),
    ("To-morrow, and to-morrow, and to-morrow,", "tomorrow and to morrow and to-morrow"),
]


@pytest.mark.parametrize("reference,prediction", CASES)
def test_rouge_l_equals_rouge_score(reference, prediction):
    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, prediction)["rougeL"]
    ours = rouge_l(reference, prediction)
    assert (ours.precision, ours.recall, ours.fmeasure) == pytest.approx((ref.precision, ref.recall, ref.fmeasure),
                                                                         abs=1e-12)


def test_rouge_l_known_values():
    assert lcs_length("abcbdab", "bdcaba") == 4  # the textbook example (CLRS 15.4)
    assert rouge_tokens("Hover through the fog--and filthy AIR.") == ["hover", "through", "the", "fog", "and",
                                                                     "filthy", "air"]
    score = rouge_l("fair is foul and foul is fair", "foul is fair")  # LCS 3 of 7 reference words, 3 of 3 predicted
    assert (score.recall, score.precision) == (3 / 7, 1.0)
    assert score.fmeasure == pytest.approx(2 * (3 / 7) / (1 + 3 / 7))


def _open_unlearning_min_k(lp, k):  # open-unlearning's MinKProbAttack.compute_score
    lp = np.asarray(lp)
    return -np.mean(np.sort(lp)[: max(1, int(len(lp) * k))])


@pytest.mark.parametrize("k", [0.05, 0.2, 0.4, 1.0])
def test_min_k_matches_reference(k):
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 40):
        lp = (-rng.exponential(2.0, n)).tolist()
        assert min_k_score(lp, k) == pytest.approx(_open_unlearning_min_k(lp, k), abs=1e-12)
    assert min_k_score([-0.1, -5.0, -1.0, -3.0, -0.2], 0.4) == pytest.approx(4.0)  # lowest 2 of 5: -5, -3


def test_membership_auc_and_privleak():
    assert membership_auc([1.0, 2.0], [3.0, 2.0]) == pytest.approx(3.5 / 4)  # 3 wins and one tie of 4 pairs
    assert membership_auc([0.1, 0.2], [5.0, 6.0]) == 1.0  # forget texts far more familiar: memorised
    assert membership_auc([5.0, 6.0], [0.1, 0.2]) == 0.0
    # MUSE's sweep: AUC of roc_curve(y, -score) with holdout labelled 1 is 1 - ours (ties aside)
    rng = np.random.default_rng(1)
    f, h = rng.normal(1, 1, 30).tolist(), rng.normal(2, 1, 25).tolist()
    muse = np.mean([[float(-b > -a) for b in h] for a in f])  # P(holdout more likely than forget)
    assert membership_auc(f, h) == pytest.approx(1 - muse)
    assert (privleak(1.0), privleak(0.5), privleak(0.0)) == (pytest.approx(-100), pytest.approx(0),
                                                             pytest.approx(100))
    with pytest.raises(ValueError, match="at least one"):
        membership_auc([], [1.0])


def test_greedy_continuations_equal_an_argmax_loop():
    tok = toy_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), seed=3)
    prompts = [tok(" ".join(NAMES[:n]))["input_ids"] for n in (1, 4, 2, 6)]  # different lengths: left padding
    lengths = [5, 3, 6, 1]
    got = greedy_continuations(model, tok, prompts, lengths, batch_size=4)
    for prompt, n, gen in zip(prompts, lengths, got):
        ids, expect = list(prompt), []
        for _ in range(n):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
            expect.append(nxt)
        assert gen == expect


def test_prompt_split_and_metrics_shape():
    tok = toy_tokenizer()
    text = TextRecord(" ".join(NAMES))  # 12 words + BOS: prefix min(32, 12 // 2) = 6 words
    prompt, ref = prompt_and_reference(tok, text, get_template())
    assert (len(prompt), len(ref)) == (7, 6)
    qa = QARecord("Which colour does Zorb wear ?", "red blue")
    prompt, ref = prompt_and_reference(tok, qa, get_template("plain"))
    assert tok.decode(ref) == "red blue"
    model = tiny_model("llama", vocab_size=len(tok), seed=1)
    records = [TextRecord(" ".join(NAMES[i:] + NAMES[:i])) for i in range(4)]
    out = text_metrics(model, tok, records, loss=2.0, holdout=[TextRecord(" ".join(reversed(NAMES)))])
    assert out["rouge_kind"] == "verbatim" and len(out["rouge_l_per_record"]) == 4
    assert 0 <= out["rouge_l_ci_low"] <= out["rouge_l_recall"] <= out["rouge_l_ci_high"] <= 1
    assert out["perplexity"] == pytest.approx(np.exp(2.0))
    assert 0 <= out["mia"]["auc"] <= 1 and out["mia"]["n_holdout"] == 1
    assert text_metrics(model, tok, [QARecord("Which colour does Zorb wear ?", "red")],
                        template="plain")["rouge_kind"] == "knowledge"


def _split(shape, acc, rouge, loss):
    return {"shape": shape, "accuracy": acc, "ci_low": acc, "ci_high": acc, "loss": loss, "rouge_l_recall": rouge}


def _metrics(forget_rouge_after, retain_loss_after, shape="text"):
    gap = {"forget": {"gap": 0.5, "ci_low": 0.4, "ci_high": 0.6, "rouge_l": {"gap": -0.01, "ci_low": -0.02,
                                                                            "ci_high": 0.0}}}
    return {"base_fp": {"forget": _split(shape, 0.9, 0.95, 0.5), "retain": _split(shape, 0.9, 0.9, 0.5)},
            "unlearned_fp": {"forget": _split(shape, 0.88, forget_rouge_after, 0.6),
                             "retain": _split(shape, 0.9, 0.9, retain_loss_after)},
            "ptq_gap": gap, "ptq_gap_by_quantizer": {"int8": gap}}


def test_scorecard_reads_rouge_and_retain_loss_on_text():
    from mansu.scorecard import ScorecardConfig, build_scorecard, format_scorecard

    card = build_scorecard(_metrics(0.30, 0.6), None)
    forget, retain, gap = (card["properties"][k] for k in ("forgetting", "retain", "ptq_gap"))
    # the ROUGE drop 0.65 as a fraction of the base's 0.95 above chance 0 (not the 0.02 token-accuracy drop)
    assert forget["drop"] == pytest.approx(0.65) and forget["value"] == pytest.approx(0.65 / 0.95) and forget["pass"]
    assert forget["metric"] == "verbatim ROUGE-L recall" and forget["chance"] == 0.0
    assert retain["pass"] and retain["loss_rise"] == pytest.approx(0.1)
    assert gap["gap"] == pytest.approx(-0.01) and gap["pass"]  # the ROUGE gap, not the token-accuracy gap
    assert gap["tested"] == pytest.approx(0.0)                  # its CI high end, / 0.95
    assert card["survives"]["int8"]["survives"]
    damaged = build_scorecard(_metrics(0.30, 1.33), None)["properties"]["retain"]  # recall kept, loss +0.83 nats
    assert not damaged["pass"] and damaged["status"] == "fail" and damaged["loss_margin"] == pytest.approx(-0.63)
    assert "loss rise +0.830" in format_scorecard(build_scorecard(_metrics(0.30, 1.33), None))
    assert build_scorecard(_metrics(0.30, 1.33), None, ScorecardConfig(retain_loss_margin=1.0))["properties"][
        "retain"]["pass"]
    with pytest.raises(ValueError, match="retain_loss_margin"):
        ScorecardConfig(retain_loss_margin=-0.1)


def test_scorecard_mcq_reads_accuracy():
    from mansu.scorecard import build_scorecard

    metrics = _metrics(0.30, 1.33, shape="mcq")
    props = build_scorecard(metrics, None)["properties"]
    # accuracy 0.9 -> 0.88 over a chance of 0.25 assumed (no "chance" recorded): 0.02 / 0.65 of the headroom
    assert props["forgetting"]["drop"] == pytest.approx(0.02) and props["forgetting"]["value"] == pytest.approx(
        0.02 / 0.65)
    assert props["ptq_gap"]["gap"] == 0.5 and props["ptq_gap"]["tested"] == pytest.approx(0.6 / 0.65)
    assert "loss_rise" not in props["retain"] and props["retain"]["rule"].startswith("(acc_retain(base)")
