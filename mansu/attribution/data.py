"""Clean/corrupted prompt pairs and the attribution metric, for MCQ records in the cloze format.

Prompt ``f"{question}\\nAnswer:"``; the answer continuation is ``" " + choices[answer]`` (see
`mansu.metrics.accuracy.cloze_texts`).

Metrics (computed from the logits, one value per example):

* ``logit_diff`` (default): ``m = logit[c] - mean_{o in O} logit[o]`` at the last prompt position, where c is the
  first token of the correct continuation and O the first tokens of the other choices (those equal to c dropped).
  A bias added to the output logits shifts m by a constant, so its gradient and m(clean) - m(corrupted) do not
  depend on any output-level logit bias -- the property CAD relies on (see `mansu.attribution.cad`).
* ``logprob``: ``m = sum_t log p(cont_t | prompt, cont_<t)`` over every token of the correct continuation
  (multi-token answers: summed log-probability, teacher-forced; the input holds prompt + cont[:-1]).

Corruptions (what the "corrupted" input is):

* ``counterfactual`` (default): the record's ``subject`` is replaced, once, by another record's subject. The partner
  is the next record (cyclically) with a different subject whose swapped prompt has the same token length; records
  with no such partner are dropped (logged, counted in the graph's metadata).
* ``mean``: the input-stream vectors at the subject's token positions are replaced by the mean input-stream
  vector over all real token positions of the batch (all question tokens after the first when no subject is given).
* ``zero``: those vectors are replaced by zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Metric = Literal["logit_diff", "logprob"]
Corruption = Literal["counterfactual", "mean", "zero"]
METRICS = ("logit_diff", "logprob")
CORRUPTIONS = ("counterfactual", "mean", "zero")


@dataclass(frozen=True)
class Example:
    """One clean/corrupted pair, token ids only."""

    index: int                    # position in the caller's record list
    clean: list[int]
    corrupt: list[int]            # same length as clean (equal to clean for mean/zero corruption)
    corrupt_positions: list[int]  # positions whose input vector is replaced (mean/zero corruption)
    target_positions: list[int]   # positions whose next-token logits the metric reads
    target_tokens: list[int]      # the correct tokens at those positions
    other_tokens: list[int]       # first tokens of the other choices (logit_diff)


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors of a list of examples."""

    clean: torch.Tensor            # [b, s] long
    corrupt: torch.Tensor          # [b, s] long
    mask: torch.Tensor             # [b, s] long, 1 on real tokens
    corrupt_mask: torch.Tensor     # [b, s] bool, positions replaced by mean/zero corruption
    target_pos: torch.Tensor       # [b, T] long
    target_tok: torch.Tensor       # [b, T] long
    target_mask: torch.Tensor      # [b, T] bool
    other_tok: torch.Tensor        # [b, K] long
    other_mask: torch.Tensor       # [b, K] bool
    indices: list[int]

    def to(self, device: Any) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)


def check_modes(metric: str, corruption: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: accepted are {', '.join(METRICS)}")
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}: accepted are {', '.join(CORRUPTIONS)}")


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _context_limit(model: Any) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _subject_positions(tokenizer: Any, question: str, subject: str | None, ctx: list[int]) -> list[int]:
    """Token positions of the subject in the prompt (by token-prefix lengths); all question tokens if unknown."""
    if subject and subject in question:
        start = question.index(subject)
        before = len(_encode(tokenizer, question[:start], True))
        through = len(_encode(tokenizer, question[:start + len(subject)], True))
        if through > before:
            return list(range(before, through))
    special = len(_encode(tokenizer, "", True))
    return list(range(special, len(ctx)))


def _answer_tokens(tokenizer: Any, record: Any) -> tuple[list[int], list[int]]:
    correct = _encode(tokenizer, " " + record.choices[record.answer], False)
    if not correct:
        raise ValueError(f"answer {record.choices[record.answer]!r} encodes to no tokens")
    others = []
    for i, choice in enumerate(record.choices):
        toks = _encode(tokenizer, " " + choice, False)
        if i != record.answer and toks and toks[0] != correct[0]:
            others.append(toks[0])
    return correct, others


def _partner_prompt(records: Sequence[Any], i: int, length: int, tokenizer: Any) -> list[int] | None:
    record = records[i]
    n = len(records)
    for step in range(1, n):
        other = records[(i + step) % n]
        if not other.subject or other.subject == record.subject:
            continue
        swapped = record.question.replace(record.subject, other.subject, 1)
        ids = _encode(tokenizer, f"{swapped}\nAnswer:", True)
        if len(ids) == length:
            return ids
    return None


def _validate_records(records: Sequence[Any], corruption: str) -> None:
    if len(records) == 0:
        raise ValueError("empty forget set: attribution needs at least one MCQ record (question, choices, answer)")
    for i, r in enumerate(records):
        if not all(hasattr(r, a) for a in ("question", "choices", "answer")):
            raise ValueError(f"record {i} is not an MCQ record: attribution accepts records with question, choices, "
                             "answer (and subject for counterfactual corruption)")
        if corruption == "counterfactual" and (not getattr(r, "subject", None) or r.subject not in r.question):
            raise ValueError(f"record {i} has no subject appearing in its question: corruption='counterfactual' needs "
                             "MCQRecord.subject; use corruption='mean' or 'zero' instead")


def build_examples(model: Any, tokenizer: Any, records: Sequence[Any], *, metric: Metric,
                   corruption: Corruption) -> tuple[list[Example], int]:
    """The clean/corrupted pairs; returns (examples, number of records dropped for want of an equal-length partner)."""
    check_modes(metric, corruption)
    _validate_records(records, corruption)
    limit = _context_limit(model)
    examples, dropped = [], 0
    for i, record in enumerate(records):
        ctx = _encode(tokenizer, f"{record.question}\nAnswer:", True)
        correct, others = _answer_tokens(tokenizer, record)
        if metric == "logit_diff" and not others:
            raise ValueError(f"record {i}: every other choice starts with the answer's first token; logit_diff needs "
                             "a distinct distractor (use metric='logprob')")
        tokens = correct if metric == "logprob" else correct[:1]
        clean = ctx + tokens[:-1]
        if limit is not None and len(clean) > limit:
            raise ValueError(f"record {i}: prompt of {len(clean)} tokens exceeds the model's context of {limit}; "
                             "shorten the question or drop the record")
        corrupt = clean
        if corruption == "counterfactual":
            partner = _partner_prompt(records, i, len(ctx), tokenizer)
            if partner is None:
                dropped += 1
                continue
            corrupt = partner + tokens[:-1]
        positions = _subject_positions(tokenizer, record.question, getattr(record, "subject", None), ctx)
        targets = list(range(len(ctx) - 1, len(ctx) - 1 + len(tokens)))
        examples.append(Example(i, clean, corrupt, positions, targets, tokens, others))
    if not examples:
        raise ValueError("no record has a counterfactual partner (another record with a different subject whose "
                         "swapped prompt has the same token length); use corruption='mean' or 'zero', or give more "
                         "records")
    if dropped:
        log.warning("dropped %d of %d records without an equal-length counterfactual partner", dropped, len(records))
    return examples, dropped


def _pad(rows: list[list[int]], width: int, value: int = 0) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _row_mask(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([[j < len(r) for j in range(width)] for r in rows], dtype=torch.bool)


def collate(examples: Sequence[Example]) -> Batch:
    width = max(len(e.clean) for e in examples)
    n_t = max(len(e.target_positions) for e in examples)
    n_o = max(max(len(e.other_tokens) for e in examples), 1)
    corrupt_mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        corrupt_mask[i, e.corrupt_positions] = True
    return Batch(
        clean=_pad([e.clean for e in examples], width), corrupt=_pad([e.corrupt for e in examples], width),
        mask=_row_mask([e.clean for e in examples], width).long(), corrupt_mask=corrupt_mask,
        target_pos=_pad([e.target_positions for e in examples], n_t),
        target_tok=_pad([e.target_tokens for e in examples], n_t),
        target_mask=_row_mask([e.target_tokens for e in examples], n_t),
        other_tok=_pad([e.other_tokens for e in examples], n_o),
        other_mask=_row_mask([e.other_tokens for e in examples], n_o),
        indices=[e.index for e in examples])


def metric_values(logits: torch.Tensor, batch: Batch, metric: Metric) -> torch.Tensor:
    """The metric of each example, [b] (float32), from logits [b, s, vocab]."""
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    at = logits[rows, batch.target_pos].float()                       # [b, T, vocab]
    if metric == "logprob":
        lp = torch.log_softmax(at, dim=-1).gather(-1, batch.target_tok[..., None])[..., 0]
        return (lp * batch.target_mask).sum(-1)
    last = at[:, 0]                                                   # [b, vocab]
    correct = last.gather(-1, batch.target_tok[:, :1])[:, 0]
    others = last.gather(-1, batch.other_tok)
    mean_other = (others * batch.other_mask).sum(-1) / batch.other_mask.sum(-1).clamp(min=1)
    return correct - mean_other
