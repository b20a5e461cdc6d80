"""Clean/corrupted prompt pairs and the attribution metric, for records of any shape (mansu.data.records).

Prompts (rendered by the run's template, mansu.data.templates; the default cloze-answer is ``f"{question}\\nAnswer:"``):

* MCQ: the template's prompt; the scored continuation is the correct choice's (``" " + choices[answer]`` in cloze).
* QA: the template's prompt of the question; the continuation is ``" " + answer``.
* text: the text's first half of tokens (at most TEXT_CONTEXT) is the prompt, the next tokens (at most TEXT_TARGET)
  the continuation.

Metrics (computed from the logits, one value per example):

* ``logit_diff`` (MCQ's default): ``m = logit[c] - mean_{o in O} logit[o]`` at the last prompt position, where c is the
  first token of the correct continuation and O the first tokens of the other choices (those equal to c dropped).
  A bias added to the output logits shifts m by a constant, so its gradient and m(clean) - m(corrupted) do not
  depend on any output-level logit bias -- the property CAD relies on (see `mansu.attribution.cad`).
* ``logprob`` (QA's and text's, which have no other choices): ``m = sum_t log p(cont_t | prompt, cont_<t)`` over every
  token of the correct continuation (teacher-forced; the input holds prompt + cont[:-1]).

Corruption kinds (what the "corrupted" input is; `run --corruption`, `attribute --corruption`, the Launch form):

* ``subject``: the record's ``subject`` is replaced, once, by another record's subject. The partner is the next record
  (cyclically) with a different subject whose swapped prompt has the same token length.
* ``shuffled-subject``: the same swap with partners tried in a seeded shuffled order; records without a subject (QA,
  MCQ without one) swap their whole question's tokens with the first tokens of a shuffled partner's question, and
  text records their prompt with a shuffled partner's first tokens (a shuffled-record counterfactual).
* ``mean-ablation`` / ``zero-ablation``: the input-stream vectors at the subject's token positions (every prompt token
  after the tokenizer's special prefix when there is no subject) are replaced by the batch's mean input-stream vector
  over real tokens / by zeros.
* ``auto`` (default): ``subject`` when every record has a subject that appears in its question, else ``mean-ablation``.

Counterfactual records with no equal-length partner are dropped (logged, counted in the graph's metadata).  The
engine (mansu.attribution.eap) sees the kinds as its three corruptions: counterfactual (token ids of the corrupted
prompt), mean, zero.  It also takes raw MCQ records with those names, as ``subject`` / ablations in cloze.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from mansu.data.records import shape_of
from mansu.data.templates import Template, get_template, lettered_choices

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


CorruptionKind = Literal["auto", "subject", "shuffled-subject", "mean-ablation", "zero-ablation"]
CORRUPTION_KINDS: tuple[str, ...] = get_args(CorruptionKind)
ENGINE_CORRUPTION = {"subject": "counterfactual", "shuffled-subject": "counterfactual", "mean-ablation": "mean",
                     "zero-ablation": "zero"}
LEGACY_KINDS = {"counterfactual": "subject", "mean": "mean-ablation", "zero": "zero-ablation"}
TEXT_CONTEXT = 32   # prompt tokens of a text record at most (its first half when shorter)
TEXT_TARGET = 16    # continuation tokens of a text record scored at most
SHUFFLE_SEED = 0


@dataclass(frozen=True)
class Prompt:
    """One record as attribution reads it, token ids only (any shape; see the module docstring)."""

    context: list[int]            # clean prompt, with the tokenizer's special prefix
    target: list[int]             # the scored continuation
    others: list[int]             # first tokens of the other choices that differ from the target's (MCQ only)
    positions: list[int]          # prompt positions an ablation replaces
    corrupt: list[int] | None     # counterfactual prompt, same length as context; None: ablation, or no partner


@dataclass(frozen=True)
class Prompts:
    """Prepared prompts of a record list with the corruption and metric the engine should use for them."""

    prompts: list[Prompt]
    kind: str          # the resolved corruption kind (never auto)
    corruption: str    # the engine's corruption: counterfactual, mean or zero
    metric: str        # logit_diff for MCQ, logprob for QA and text


def check_modes(metric: str, corruption: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: accepted are {', '.join(METRICS)}")
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}: accepted are {', '.join(CORRUPTIONS)}")


def check_kind(kind: str) -> str:
    """`kind` as a corruption kind (the engine's old names accepted as aliases); ValueError listing them otherwise."""
    kind = LEGACY_KINDS.get(kind, kind)
    if kind not in CORRUPTION_KINDS:
        raise ValueError(f"unknown corruption {kind!r}: accepted are {', '.join(CORRUPTION_KINDS)}")
    return kind


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _context_limit(model: Any) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _has_subject(record: Any) -> bool:
    subject = getattr(record, "subject", None)
    return bool(subject) and subject in getattr(record, "question", "")


def resolve_kind(kind: str, records: Sequence[Any]) -> str:
    """The corruption kind for `records`: auto resolved; subject on records without subjects is a one-line error."""
    kind = check_kind(kind)
    with_subject = bool(records) and all(_has_subject(r) for r in records)
    if kind == "auto":
        return "subject" if with_subject else "mean-ablation"
    if kind == "subject" and not with_subject:
        missing = next(i for i, r in enumerate(records) if not _has_subject(r)) if records else 0
        raise ValueError(f"record {missing + 1} has no subject appearing in its question: corruption 'subject' needs "
                         "MCQ records with a 'subject' field; use shuffled-subject, mean-ablation or zero-ablation")
    return kind


def prepare_prompts(tokenizer: Any, records: Sequence[Any], *, template: str | Template | None = None,
                    kind: str = "auto", metric: str | None = None, seed: int = SHUFFLE_SEED) -> Prompts:
    """Clean prompts, continuations and counterfactuals of `records` (one shape) under `template` and `kind`."""
    if len(records) == 0:
        raise ValueError("empty forget set: attribution needs at least one record")
    shape = shape_of(list(records))
    kind = resolve_kind(kind, records)
    default_metric = "logit_diff" if shape == "mcq" else "logprob"
    metric = metric or default_metric
    if metric == "logit_diff" and shape != "mcq":
        raise ValueError(f"metric 'logit_diff' needs MCQ records (other choices to compare with); {shape} records "
                         "are attributed with metric 'logprob'")
    tmpl = get_template(template)
    build = _text_prompt if shape == "text" else _question_prompt
    built = [build(tokenizer, r, tmpl, i) for i, r in enumerate(records)]
    if ENGINE_CORRUPTION[kind] == "counterfactual":
        prompts = _with_partners(tokenizer, records, built, tmpl, kind, seed)
    else:
        prompts = [prompt for prompt, _ in built]
    return Prompts(prompts, kind, ENGINE_CORRUPTION[kind], metric)


Span = tuple[int, int]  # token positions [start, end) a counterfactual may replace


def _question_prompt(tokenizer: Any, record: Any, tmpl: Template, i: int) -> tuple[Prompt, Span]:
    """MCQ or QA: the template's prompt, the correct continuation, the distractors' first tokens, ablated positions;
    and the question's token span."""
    choices = getattr(record, "choices", None)
    context = tmpl.context(record.question, choices=choices, subject=getattr(record, "subject", None),
                           where=f"record {i + 1}")
    ctx = _encode(tokenizer, context, True)
    if choices is None:
        target, others = _encode(tokenizer, f" {record.answer}", False), []
    else:
        target, others = _answer_tokens(tokenizer, record, tmpl)
    if not target:
        raise ValueError(f"record {i + 1}: the answer encodes to no tokens")
    start, end = _question_span(tokenizer, tmpl, record, ctx)
    positions = _subject_positions(tokenizer, tmpl, record, ctx) if _has_subject(record) else None
    special = len(_encode(tokenizer, "", True))
    return Prompt(ctx, target, others, positions or list(range(special, len(ctx))), None), (start, end)


def _text_prompt(tokenizer: Any, record: Any, tmpl: Template, i: int) -> tuple[Prompt, Span]:
    """Text: its first half of tokens (at most TEXT_CONTEXT) as prompt, the next ones as continuation."""
    ids = _encode(tokenizer, record.text, True)
    special = len(_encode(tokenizer, "", True))
    if len(ids) - special < 2:
        raise ValueError(f"record {i + 1}: text of {len(ids) - special} token(s); attribution needs at least 2 (a "
                         "prompt and a token to predict)")
    cut = min(special + TEXT_CONTEXT, max(special + 1, len(ids) // 2))
    span = (special, cut)
    return Prompt(ids[:cut], ids[cut:cut + TEXT_TARGET], [], list(range(*span)), None), span


def _question_span(tokenizer: Any, tmpl: Template, record: Any, ctx: list[int]) -> Span:
    """Token span of the question in the prompt (by token-prefix lengths of the template's text before it)."""
    before = _render_before(tmpl, record)
    start = len(_encode(tokenizer, before, True))
    end = len(_encode(tokenizer, before + record.question, True))
    return start, min(max(end, start), len(ctx))


def _render_before(tmpl: Template, record: Any) -> str:
    """The rendered template text before {question} (empty for the presets that start with it)."""
    head = tmpl.text.split("{question}", 1)[0]
    return head.format(subject=getattr(record, "subject", None) or "",
                       choices=lettered_choices(tuple(getattr(record, "choices", None) or ())))


def _subject_positions(tokenizer: Any, tmpl: Template, record: Any, ctx: list[int]) -> list[int]:
    """Token positions of the subject in the prompt's question (by token-prefix lengths)."""
    before = _render_before(tmpl, record)
    start = record.question.index(record.subject)
    first = len(_encode(tokenizer, before + record.question[:start], True))
    through = len(_encode(tokenizer, before + record.question[:start + len(record.subject)], True))
    return list(range(first, min(through, len(ctx))))


def _answer_tokens(tokenizer: Any, record: Any, tmpl: Template) -> tuple[list[int], list[int]]:
    continuations = tmpl.continuations(record.choices)
    correct = _encode(tokenizer, continuations[record.answer], False)
    if not correct:
        raise ValueError(f"answer {record.choices[record.answer]!r} encodes to no tokens")
    others = []
    for i, cont in enumerate(continuations):
        toks = _encode(tokenizer, cont, False)
        if i != record.answer and toks and toks[0] != correct[0]:
            others.append(toks[0])
    return correct, others


def _partner_order(n: int, i: int, kind: str, seed: int) -> list[int]:
    """Candidate partners of record i: the next records cyclically (subject) or a seeded shuffle (shuffled-*)."""
    if kind == "subject":
        return [(i + step) % n for step in range(1, n)]
    order = [j for j in range(n) if j != i]
    random.Random(seed * 1_000_003 + i).shuffle(order)
    return order


def _with_partners(tokenizer: Any, records: Sequence[Any], built: list[tuple[Prompt, Span]], tmpl: Template, kind: str,
                   seed: int) -> list[Prompt]:
    """Each prompt with its counterfactual (None when no equal-length partner exists)."""
    out = []
    for i, (prompt, span) in enumerate(built):
        corrupt = None
        for j in _partner_order(len(records), i, kind, seed):
            if _has_subject(records[i]):
                corrupt = _subject_swap(tokenizer, tmpl, records[i], records[j], len(prompt.context))
            else:
                corrupt = _span_swap(prompt.context, span, built[j][0].context, built[j][1])
            if corrupt is not None:
                break
        out.append(Prompt(prompt.context, prompt.target, prompt.others, prompt.positions, corrupt))
    return out


def _subject_swap(tokenizer: Any, tmpl: Template, record: Any, other: Any, length: int) -> list[int] | None:
    """The prompt with the record's subject replaced (once) by `other`'s, when that keeps the token length."""
    if not getattr(other, "subject", None) or other.subject == record.subject:
        return None
    swapped = record.question.replace(record.subject, other.subject, 1)
    ids = _encode(tokenizer, tmpl.context(swapped, choices=getattr(record, "choices", None), subject=other.subject),
                  True)
    return ids if len(ids) == length else None


def _span_swap(ctx: list[int], span: Span, other: list[int], other_span: Span) -> list[int] | None:
    """`ctx` with its span's tokens replaced by the first as many tokens of `other`'s span (None if too short)."""
    start, end = span
    theirs = other[other_span[0]:other_span[1]]
    if end <= start or len(theirs) < end - start or theirs[: end - start] == ctx[start:end]:
        return None
    return ctx[:start] + theirs[: end - start] + ctx[end:]


def _legacy_prompts(tokenizer: Any, records: Sequence[Any], corruption: str) -> list[Prompt]:
    """Raw MCQ records given to the engine with its own corruption names: the cloze template, subject partners."""
    if len(records) == 0:
        raise ValueError("empty forget set: attribution needs at least one MCQ record (question, choices, answer)")
    for i, r in enumerate(records):
        if not all(hasattr(r, a) for a in ("question", "choices", "answer")):
            raise ValueError(f"record {i} is not an MCQ record: attribution accepts records with question, choices, "
                             "answer (and subject for counterfactual corruption); prepare other shapes with "
                             "prepare_prompts")
        if corruption == "counterfactual" and not _has_subject(r):
            raise ValueError(f"record {i} has no subject appearing in its question: corruption='counterfactual' needs "
                             "MCQRecord.subject; use corruption='mean' or 'zero' instead")
    return prepare_prompts(tokenizer, records, kind=LEGACY_KINDS[corruption]).prompts


def build_examples(model: Any, tokenizer: Any, records: Sequence[Any], *, metric: Metric,
                   corruption: Corruption) -> tuple[list[Example], int]:
    """The clean/corrupted pairs of prepared `Prompt`s (or raw MCQ records); returns (examples, number of records
    dropped for want of an equal-length counterfactual partner)."""
    check_modes(metric, corruption)
    prompts = list(records) if records and all(isinstance(r, Prompt) for r in records) else \
        _legacy_prompts(tokenizer, records, corruption)
    limit = _context_limit(model)
    examples, dropped = [], 0
    for i, p in enumerate(prompts):
        if metric == "logit_diff" and not p.others:
            raise ValueError(f"record {i}: every other choice starts with the answer's first token (or there are no "
                             "other choices); logit_diff needs a distinct distractor (use metric='logprob')")
        tokens = p.target if metric == "logprob" else p.target[:1]
        clean = p.context + tokens[:-1]
        if limit is not None and len(clean) > limit:
            raise ValueError(f"record {i}: prompt of {len(clean)} tokens exceeds the model's context of {limit}; "
                             "shorten the question or drop the record")
        corrupt = clean
        if corruption == "counterfactual":
            if p.corrupt is None:
                dropped += 1
                continue
            corrupt = p.corrupt + tokens[:-1]
        targets = list(range(len(p.context) - 1, len(p.context) - 1 + len(tokens)))
        examples.append(Example(i, clean, corrupt, p.positions, targets, tokens, p.others))
    if not examples:
        raise ValueError("no record has a counterfactual partner (another record with a different subject or "
                         "question whose swapped prompt has the same token length); use mean-ablation or "
                         "zero-ablation (corruption='mean' or 'zero'), or give more records")
    if dropped:
        log.warning("dropped %d of %d records without an equal-length counterfactual partner", dropped, len(prompts))
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
