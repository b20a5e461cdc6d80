"""MCQ accuracy under any prompt template (mansu.data.templates), batched, with a 95% percentile-bootstrap
confidence interval.  The two formats of `--format` are the templates of the same names:

    letter: lm-eval's WMDP template, context "question\\nA. c0\\nB. c1\\nC. c2\\nD. c3\\nAnswer:",
            prediction = argmax_k log p(" <letter_k>" | context)
    cloze:  context "question\\nAnswer:", prediction = argmax_k sum_t log p(choice_k token t | context, earlier tokens)
            over the tokens of " <choice_k>" (multi-token choices summed, not length-normalised)

Any template without {choices} is scored like cloze, any with {choices} like letter.

Context and continuation are tokenized separately and concatenated (as lm-eval does), so the
continuation's tokens are the same whatever the context.  Every sequence is checked against the model's
context length (config.max_position_embeddings) before the first forward pass: a longer one is an error
naming the record, never a silent truncation or an hour-long pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from mansu.data.records import MCQRecord
from mansu.data.templates import FORMAT_TEMPLATES, Template, get_template
from mansu.devices import input_device

Format = Literal["cloze", "letter"]
FORMATS = ("cloze", "letter")


@dataclass(frozen=True)
class AccuracyResult:
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    fmt: str
    correct: list[bool] = field(repr=False)
    template: str = "cloze-answer"

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n,
                "fmt": self.fmt, "template": self.template, "correct": [int(c) for c in self.correct]}


def cloze_texts(record: MCQRecord) -> tuple[str, list[str]]:
    """Context and the continuations scored in the cloze format."""
    return format_texts(record, "cloze")


def letter_texts(record: MCQRecord) -> tuple[str, list[str]]:
    """Context and the continuations scored in lm-eval's WMDP letter format."""
    return format_texts(record, "letter")


def resolve_template(fmt: Format, template: str | Template | None) -> Template:
    """The template to score with: `template` when given, else the one `fmt` names."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown MCQ format {fmt!r}: accepted are {', '.join(FORMATS)}")
    return get_template(template if template is not None else FORMAT_TEMPLATES[fmt])


def format_texts(record: MCQRecord, fmt: Format = "cloze", template: str | Template | None = None) -> tuple[str,
                                                                                                           list[str]]:
    """Context and the scored continuation of each choice of `record`."""
    tmpl = resolve_template(fmt, template)
    return (tmpl.context(record.question, choices=record.choices, subject=record.subject),
            tmpl.continuations(record.choices))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context (with the tokenizer's special prefix) and continuation (without)."""
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont


def context_length(model_or_config) -> int | None:
    """The longest sequence a model (or its config, for a check before loading weights) was built for
    (max_position_embeddings or n_positions); None if unknown."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def check_context(model, lengths: Sequence[int], *, owners: Sequence[int] | None = None,
                  source: str | None = None) -> None:
    """ValueError naming the first sequence (its record with `owners`, its file with `source`) longer than the
    model's context."""
    check_lengths(context_length(model), lengths, owners=owners, source=source)


def check_lengths(limit: int | None, lengths: Sequence[int], *, owners: Sequence[int] | None = None,
                  source: str | None = None) -> None:
    """`check_context` against a known limit (None: unknown, nothing to check)."""
    if limit is None:
        return
    for i, n in enumerate(lengths):
        if n > limit:
            which = f"record {owners[i] + 1}" if owners is not None else f"sequence {i + 1}"
            which = f"{source}: {which}" if source else which
            raise ValueError(f"{which}: prompt and choice take {n:,} tokens, longer than the model's context of "
                             f"{limit:,} tokens; shorten the record (records longer than the context are not scored)")


def check_records_fit(tokenizer, limit: int | None, records: Sequence[MCQRecord], *, fmt: Format = "cloze",
                      source: str | None = None, template: str | Template | None = None) -> None:
    """The context check `mcq_accuracy` makes, without a model (the limit from its config): for a preflight
    that refuses a run before its folder exists."""
    lengths, owners = [], []
    for r_i, record in enumerate(records):
        context, continuations = format_texts(record, fmt, template)
        for cont in continuations:
            ctx_ids, cont_ids = encode_pair(tokenizer, context, cont)
            lengths.append(len(ctx_ids) + len(cont_ids))
            owners.append(r_i)
    check_lengths(limit, lengths, owners=owners, source=source)


def continuation_logprobs(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64,
                          owners: Sequence[int] | None = None, source: str | None = None) -> list[float]:
    """sum_t log p(cont_t | context, cont_<t) for each (context, continuation) pair, batched with right padding;
    `owners` (the record index of each pair) and `source` (their file) only name the record in a too-long error.

    Single-token continuations of one context (the usual MCQ: answer words or letters) are read from one forward
    pass over the context alone, its last position's next-token distribution: a 4-choice question costs one
    sequence instead of four (the same value by causality, up to float rounding of other batch shapes)."""
    import torch

    encoded = [encode_pair(tokenizer, c, x) for c, x in pairs]
    check_context(model, [len(ctx) + len(cont) for ctx, cont in encoded], owners=owners, source=source)
    scores: list[float] = [0.0] * len(encoded)
    contexts: dict[tuple[int, ...], list[int]] = {}   # context -> the pairs scored from its last position
    longer = []
    for i, (ctx, cont) in enumerate(encoded):
        if len(cont) == 1:
            contexts.setdefault(tuple(ctx), []).append(i)
        else:
            longer.append(i)
    shared = list(contexts)
    for ctx, logp in zip(shared, _next_token_logprobs(model, [list(c) for c in shared], batch_size)):
        for i in contexts[ctx]:
            scores[i] = logp[encoded[i][1][0]].item()
    for start in range(0, len(longer), batch_size):
        chunk = longer[start:start + batch_size]
        logprobs = _sequence_logprobs(model, [encoded[i][0] + encoded[i][1] for i in chunk])
        for row, i in enumerate(chunk):
            ctx, cont = encoded[i]
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
            scores[i] = logprobs[row, positions, torch.tensor(cont)].sum().item()
    return scores


def _sequence_logprobs(model, seqs: list[list[int]]):
    """log-softmax of the model's logits over right-padded `seqs`: CPU fp32 [batch, width, vocab]."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    device = input_device(model)
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    return torch.log_softmax(logits, dim=-1).cpu()


def _next_token_logprobs(model, contexts: list[list[int]], batch_size: int):
    """Per context, log p(next token) at its last position: CPU fp32 [vocab] each."""
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start:start + batch_size]
        logprobs = _sequence_logprobs(model, chunk)
        yield from (logprobs[row, len(ctx) - 1] for row, ctx in enumerate(chunk))


def predict(model, tokenizer, records: Sequence[MCQRecord], *, fmt: Format = "cloze", batch_size: int = 64,
            source: str | None = None, template: str | Template | None = None) -> list[int]:
    """The predicted choice index of each record (`source`, the records' file, names it in errors)."""
    pairs, owners = [], []
    for r_i, record in enumerate(records):
        context, continuations = format_texts(record, fmt, template)
        pairs += [(context, c) for c in continuations]
        owners += [r_i] * len(continuations)
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size, owners=owners, source=source)
    best: dict[int, tuple[float, int]] = {}
    counters: dict[int, int] = {}
    for owner, score in zip(owners, scores):
        k = counters.get(owner, 0)
        counters[owner] = k + 1
        if owner not in best or score > best[owner][0]:  # ties keep the first choice
            best[owner] = (score, k)
    return [best[i][1] for i in range(len(records))]


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float,
                                                                                                              float]:
    """Percentile bootstrap interval of the mean of `values` (resampling examples with replacement)."""
    import torch

    if len(values) == 0:
        raise ValueError("bootstrap needs at least one value")
    data = torch.as_tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(data), (n_boot, len(data)), generator=gen)
    means = data[idx].mean(dim=1)
    alpha = (1 - level) / 2
    return float(torch.quantile(means, alpha)), float(torch.quantile(means, 1 - alpha))


def mcq_accuracy(model, tokenizer, records: Sequence[MCQRecord], *, fmt: Format = "cloze", batch_size: int = 64,
                 n_boot: int = 1000, seed: int = 0, source: str | None = None,
                 template: str | Template | None = None) -> AccuracyResult:
    """Accuracy of `model` on `records` with a 95% bootstrap CI over examples; a record longer than the model's
    context is a ValueError naming it (and `source`, its file) before any forward pass."""
    if not records:
        raise ValueError("empty split: accuracy needs at least one MCQ record")
    tmpl = resolve_template(fmt, template)
    preds = predict(model, tokenizer, records, fmt=fmt, batch_size=batch_size, source=source, template=tmpl)
    correct = [p == r.answer for p, r in zip(preds, records)]
    lo, hi = bootstrap_ci([float(c) for c in correct], n_boot=n_boot, seed=seed)
    return AccuracyResult(accuracy=sum(correct) / len(correct), ci_low=lo, ci_high=hi, n=len(correct),
                          fmt=fmt, correct=correct, template=tmpl.name)
