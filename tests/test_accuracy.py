"""MCQ evaluation: batched scores equal a brute-force one-sequence-at-a-time reference on a tiny model."""

import pytest
import torch

from mansu.data.records import MCQRecord
from mansu.metrics.accuracy import bootstrap_ci, letter_texts, mcq_accuracy, predict
from mansu.models.demo import build_tokenizer
from mansu.testing import tiny_llama

RECORDS = [
    MCQRecord("Where was Zorvath born?", ("Quorvel", "Varnoth", "Pellucor", "Obrecant"), 1),
    MCQRecord("Which guild does Kelandor belong to?", ("Tinwrights", "Loomkeepers saltcallers", "Emberwards"), 2),
    MCQRecord("Which beast travels with Ulira?", ("glimmerfox", "stonewhelp marshwing duskhound", "reedcat",
                                                  "tidehare"), 0),
]


@pytest.fixture(scope="module")
def tiny():
    texts = [r.question + " " + " ".join(r.choices) for r in RECORDS]
    tok = build_tokenizer(texts + ["A . B . C . D . Answer :"])
    return tiny_llama(len(tok), seed=3), tok


def brute_force_scores(model, tok, context, continuations):
    """log p(continuation | context), one unpadded sequence at a time, token by token."""
    scores = []
    for cont in continuations:
        ids = tok(context)["input_ids"]
        total = 0.0
        for t in tok(cont, add_special_tokens=False)["input_ids"]:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            total += torch.log_softmax(logits.double(), -1)[t].item()
            ids = ids + [t]
        scores.append(total)
    return scores


@pytest.mark.parametrize("fmt", ["cloze", "letter"])
def test_predictions_match_brute_force(tiny, fmt):
    model, tok = tiny
    from mansu.metrics.accuracy import format_texts

    expected = [max(range(len(r.choices)), key=lambda k, s=brute_force_scores(model, tok, *format_texts(r, fmt)): s[k])
                for r in RECORDS]
    assert predict(model, tok, RECORDS, fmt=fmt, batch_size=2) == expected


def test_batched_scores_equal_reference(tiny):
    model, tok = tiny
    from mansu.metrics.accuracy import cloze_texts, continuation_logprobs

    context, conts = cloze_texts(RECORDS[2])
    batched = continuation_logprobs(model, tok, [(context, c) for c in conts], batch_size=3)
    assert batched == pytest.approx(brute_force_scores(model, tok, context, conts), abs=1e-4)


def test_letter_template_is_lm_eval_wmdp():
    context, conts = letter_texts(RECORDS[0])
    assert context == "Where was Zorvath born?\nA. Quorvel\nB. Varnoth\nC. Pellucor\nD. Obrecant\nAnswer:"
    assert conts == [" A", " B", " C", " D"]


def test_accuracy_counts_and_interval(tiny):
    model, tok = tiny
    preds = predict(model, tok, RECORDS)
    res = mcq_accuracy(model, tok, RECORDS)
    assert res.accuracy == pytest.approx(sum(p == r.answer for p, r in zip(preds, RECORDS)) / 3)
    assert res.ci_low <= res.accuracy <= res.ci_high and res.n == 3


def test_bootstrap_interval_brackets_mean_and_shrinks_with_n():
    small = bootstrap_ci([1.0, 0.0] * 10)
    large = bootstrap_ci([1.0, 0.0] * 500)
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert (large[1] - large[0]) < (small[1] - small[0]) / 4
    assert bootstrap_ci([1.0] * 30) == (1.0, 1.0)


def test_empty_split_and_unknown_format(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="empty split"):
        mcq_accuracy(model, tok, [])
    with pytest.raises(ValueError, match="unknown MCQ format 'mc2': accepted are cloze, letter"):
        mcq_accuracy(model, tok, RECORDS, fmt="mc2")
