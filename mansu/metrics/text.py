"""Memorisation metrics of QA and text splits, following MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way
Evaluation") and TOFU (Maini et al. 2024); MCQ splits have none of them.

    verbatim memorisation (text records, MUSE's VerbMem): the record's first p tokens are the prompt, p = min(32,
        n // 2) of its n predictable tokens (MUSE prompts with 32; short lines are split in half); the model
        continues greedily for as many tokens as the true continuation has (at most 128, MUSE's length, the reference
        truncated to the same), and the decoded continuation is scored by ROUGE-L against the true one
    knowledge memorisation (QA records, MUSE's KnowMem / TOFU's ROUGE): the prompt is the template's context, the
        greedy answer (as many tokens as the true answer, at most 128) is scored by ROUGE-L against the answer
    ROUGE-L: the `rouge_score` package's rougeL without stemming (MUSE's setting): lower-case, every run of characters
        outside [a-z0-9] a separator, LCS over the word tokens; recall = LCS / |reference| (TOFU's statistic),
        F = 2PR / (P + R) (MUSE's); an empty side scores 0.  TOFU also Porter-stems words; that variant is not used.
    perplexity: exp(loss), the split's mean per-token NLL (mansu.metrics.scoring "loss")
    membership inference (a forget split with a holdout set, MUSE's PrivLeak): per record the Min-K% score,
        -mean of the lowest 40% (at least one) of the scored tokens' log-probabilities (Shi et al. 2023; MUSE's
        Min-40%); auc = P(score(forget record) < score(holdout record)) + P(tie) / 2, open-unlearning's convention:
        1 when forget texts look like training data, 0.5 when they are as unfamiliar as the holdout texts;
        privleak = (AUC_MUSE - 0.5) / 0.5 * 100 with MUSE's orientation AUC_MUSE = 1 - auc and 0.5 in place of the
        retrained model's AUC (an ideal retrain cannot tell two unseen sets apart): about -100 on a model that
        memorised the forget set, 0 when unlearned, positive when over-unlearned

The headline per record is the ROUGE-L recall ("rouge_l_per_record"): the scorecard reads forgetting, retain recall
and the PTQ gap of QA/text splits on it (mansu.scorecard).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mansu.data.records import MCQRecord, Record, TextRecord, shape_of
from mansu.data.templates import Template, get_template
from mansu.devices import input_device
from mansu.metrics.accuracy import bootstrap_ci
from mansu.metrics.scoring import encode_target, token_logprobs

PREFIX_TOKENS = 32     # MUSE's VerbMem prompt length
MAX_NEW_TOKENS = 128   # MUSE's VerbMem generation length; the reference is cut to it too
MIN_K = 0.4            # MUSE's PrivLeak uses Min-40%
AUC_REFERENCE = 0.5    # stands in for the retrained model's AUC (MUSE's PrivLeak reference)
_SEPARATORS = re.compile(r"[^a-z0-9]+")
ROUGE_KINDS = {"text": "verbatim", "qa": "knowledge"}
ROUGE_PER_RECORD = "rouge_l_per_record"  # the key of the per-record recall in a split's scores


@dataclass(frozen=True)
class RougeL:
    precision: float
    recall: float
    fmeasure: float


def rouge_tokens(text: str) -> list[str]:
    """The words ROUGE compares: rouge_score's default tokenizer without stemming."""
    return [t for t in _SEPARATORS.sub(" ", text.lower()).split() if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one row of the DP table at a time: O(|b|) memory)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_l(reference: str, prediction: str) -> RougeL:
    """ROUGE-L of `prediction` against `reference` (rouge_score's rougeL, use_stemmer=False)."""
    ref, pred = rouge_tokens(reference), rouge_tokens(prediction)
    if not ref or not pred:
        return RougeL(0.0, 0.0, 0.0)
    lcs = lcs_length(ref, pred)
    p, r = lcs / len(pred), lcs / len(ref)
    return RougeL(p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0)


def min_k_score(logprobs: Sequence[float], k: float = MIN_K) -> float:
    """Min-K% score: -mean of the lowest max(1, int(n k)) token log-probabilities (higher: less familiar)."""
    if not logprobs:
        raise ValueError("Min-K% needs at least one scored token")
    lowest = sorted(logprobs)[: max(1, int(len(logprobs) * k))]
    return -sum(lowest) / len(lowest)


def membership_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """P(a forget record scores below a holdout record) + P(tie) / 2: 1 when every forget text is more familiar
    (lower Min-K%) than every holdout text (the Mann-Whitney form of the ROC AUC)."""
    if not forget_scores or not holdout_scores:
        raise ValueError("membership AUC needs at least one forget and one holdout record")
    wins = sum((f < h) + 0.5 * (f == h) for f in forget_scores for h in holdout_scores)
    return wins / (len(forget_scores) * len(holdout_scores))


def privleak(auc: float, reference: float = AUC_REFERENCE) -> float:
    """MUSE's PrivLeak in percent from an AUC in open-unlearning's orientation (see the module docstring)."""
    return ((1 - auc) - (1 - reference)) / (1 - reference) * 100


def prompt_and_reference(tokenizer: Any, record: Record, template: Template) -> tuple[list[int], list[int]]:
    """(prompt ids, true continuation ids) of one QA or text record (the split rules in the module docstring)."""
    ids, start = encode_target(tokenizer, record, template)
    if isinstance(record, TextRecord):
        start += min(PREFIX_TOKENS, (len(ids) - start) // 2)
    return ids[:start], ids[start:start + MAX_NEW_TOKENS]


def greedy_continuations(model: Any, tokenizer: Any, prompts: Sequence[list[int]], lengths: Sequence[int], *,
                         batch_size: int = 32) -> list[list[int]]:
    """Greedy continuation of each prompt, lengths[i] new tokens at most (stopping early at EOS), batched with
    left padding (HF generate derives the positions from the attention mask)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = tokenizer.eos_token_id
    device = input_device(model)
    out: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        chunk, want = prompts[first:first + batch_size], lengths[first:first + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max(max(want), 1), pad_token_id=pad, eos_token_id=eos,
                                 num_beams=1).cpu()
        for i, n in enumerate(want):
            new = gen[i, width:width + n].tolist()
            out.append(new[: new.index(eos)] if eos is not None and eos in new else new)
    return out


def rouge_memorisation(model: Any, tokenizer: Any, records: Sequence[Record], template: Template, *,
                       batch_size: int = 32, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean ROUGE-L recall and F of the greedy continuations against the true ones, with a bootstrap CI of the
    recall and its per-record values."""
    pairs = [prompt_and_reference(tokenizer, r, template) for r in records]
    generated = greedy_continuations(model, tokenizer, [p for p, _ in pairs], [len(ref) for _, ref in pairs],
                                     batch_size=batch_size)
    scores = [rouge_l(tokenizer.decode(ref, skip_special_tokens=True), tokenizer.decode(gen, skip_special_tokens=True))
              for (_, ref), gen in zip(pairs, generated)]
    recall = [s.recall for s in scores]
    lo, hi = bootstrap_ci(recall, n_boot=n_boot, seed=seed)
    return {"rouge_l_recall": sum(recall) / len(recall), "rouge_l_f": sum(s.fmeasure for s in scores) / len(scores),
            "rouge_l_ci_low": lo, "rouge_l_ci_high": hi, ROUGE_PER_RECORD: recall}


def min_k_scores(model: Any, tokenizer: Any, records: Sequence[Record], template: Template, *,
                 batch_size: int = 64) -> list[float]:
    """Min-K% score of each record over its scored tokens (the whole text; a QA record's answer)."""
    return [min_k_score(lp.tolist()) for lp, _ in
            token_logprobs(model, [encode_target(tokenizer, r, template) for r in records], batch_size=batch_size)]


def membership(model: Any, tokenizer: Any, forget: Sequence[Record], holdout: Sequence[Record], template: Template,
               *, batch_size: int = 64) -> dict[str, Any]:
    """The membership-inference signal of a forget split against a holdout set (see the module docstring)."""
    auc = membership_auc(min_k_scores(model, tokenizer, forget, template, batch_size=batch_size),
                         min_k_scores(model, tokenizer, holdout, template, batch_size=batch_size))
    return {"auc": auc, "privleak": privleak(auc), "k": MIN_K, "n_forget": len(forget), "n_holdout": len(holdout)}


def check_holdout(forget: Sequence[Record], holdout: Sequence[Record], source: str = "holdout set") -> None:
    """A holdout set holds QA or text records of the forget set's shape (ValueError in one line otherwise)."""
    want, got = shape_of(list(forget)), shape_of(list(holdout))
    if want == "mcq":
        raise ValueError(f"{source}: the membership signal is computed for QA and text forget sets; the forget set "
                         "holds MCQ records (drop the holdout set)")
    if got != want:
        raise ValueError(f"{source}: {got} records, but the forget set holds {want} records; give holdout records "
                         "of the forget set's shape")


def text_metrics(model: Any, tokenizer: Any, records: Sequence[Record], *, loss: float | None = None,
                 template: str | Template | None = None, holdout: Sequence[Record] | None = None,
                 batch_size: int = 32, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The memorisation metrics of one split, merged into its scores (mansu.metrics.scoring.score_records) by the
    run's eval stages; {} for MCQ records.  `loss` (the split's mean NLL) gives the perplexity; `holdout` (records
    never trained on) adds the membership-inference signal."""
    if not records or isinstance(records[0], MCQRecord):
        return {}
    tmpl = get_template(template)
    shape = shape_of(list(records))
    out: dict[str, Any] = {"rouge_kind": ROUGE_KINDS[shape],
                           **rouge_memorisation(model, tokenizer, records, tmpl, batch_size=batch_size,
                                                n_boot=n_boot, seed=seed)}
    if loss is not None:
        out["perplexity"] = math.exp(min(loss, 700.0))  # exp overflows past ~709 nats
    if holdout:
        check_holdout(records, holdout)
        out["mia"] = membership(model, tokenizer, records, holdout, tmpl)
    return out


def text_summary(metrics: dict[str, Any]) -> str | None:
    """One line of a run's QA/text memorisation metrics, base -> unlearned (fp), for the Runs page; None without."""
    base, after = (metrics or {}).get("base_fp") or {}, (metrics or {}).get("unlearned_fp") or {}
    if "rouge_l_recall" not in (base.get("forget") or {}):
        return None
    parts = []
    for split in ("forget", "retain"):
        b, a = base.get(split) or {}, after.get(split) or {}
        if "rouge_l_recall" in b:
            parts.append(f"{split} {b['rouge_kind']} ROUGE-L recall {b['rouge_l_recall']:.2f} → "
                         f"{a.get('rouge_l_recall', float('nan')):.2f}, loss {b['loss']:.2f} → "
                         f"{a.get('loss', float('nan')):.2f} nats")
    mia_b, mia_a = (base.get("forget") or {}).get("mia"), (after.get("forget") or {}).get("mia")
    if mia_b and mia_a:
        parts.append(f"membership AUC {mia_b['auc']:.2f} → {mia_a['auc']:.2f} (PrivLeak {mia_b['privleak']:+.0f} → "
                     f"{mia_a['privleak']:+.0f})")
    return " · ".join(parts)


def _stages(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, evaluation) of every eval stage of a run that holds QA/text scores: base and unlearned, fp, NF4 and
    each further quantizer of the run."""
    out = []
    for who in ("base", "unlearned"):
        out += [(f"{who} fp", metrics.get(f"{who}_fp")), (f"{who} nf4", metrics.get(f"{who}_nf4"))]
        out += [(f"{who} {q}", ev) for q, ev in (metrics.get(f"{who}_quant") or {}).items() if q != "nf4"]
    return [(label, ev) for label, ev in out if isinstance(ev, dict) and "rouge_l_recall" in (ev.get("forget") or {})]


def text_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per eval stage of a QA/text run (see `_stages`): ROUGE-L recall and loss of forget and retain, and
    the membership AUC when a holdout set was given; [] for an MCQ run (the app's Before/after table, compare)."""
    rows = []
    for label, ev in _stages(metrics or {}):
        f, r = ev.get("forget") or {}, ev.get("retain") or {}
        row = {"stage": label, f"forget {f['rouge_kind']} ROUGE-L": f["rouge_l_recall"],
               "retain ROUGE-L": r.get("rouge_l_recall"), "forget loss": f.get("loss"), "retain loss": r.get("loss")}
        if f.get("mia"):
            row["membership AUC"] = f["mia"]["auc"]
        rows.append(row)
    return rows
