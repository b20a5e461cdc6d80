"""One split's scores for any record shape: what `eval` prints and every eval stage of a run stores.

    mcq:  accuracy     = MCQ accuracy under the template (mansu.metrics.accuracy; cloze by default); chance =
                         mean over records of 1 / number of choices (the scorecard measures forgetting above it)
    qa:   loss         = mean over records of -1/|y| sum_t log p(y_t | template(question), y_<t), y the answer's tokens
          accuracy     = token accuracy: mean over records of the fraction of y's tokens that are the model's top-1
                         next token given the true prefix (teacher forced)
          exact_match  = fraction of records whose every answer token is top-1, i.e. greedy decoding from the prompt
                         reproduces the answer exactly (greedy decoding follows the teacher-forced path as long as each
                         step's argmax is the true token; exact ties between logits aside)
    text: the same three over every token of the text after the first, with no template and no prompt

Every result has "accuracy" in [0, 1], higher when the model knows more, with a 95% bootstrap CI over records, and a
per-record "correct" (MCQ: 0/1; QA/text: the record's token accuracy) so the scorecard's forgetting and retain
properties and the paired PTQ gap read every shape the same way: on QA and text they are read on token accuracy, the
per-token form of the loss (the loss itself is reported beside it; loss-based thresholds are a later scorecard
item).  "metric" names what "accuracy" is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mansu.data.records import MCQRecord, Record, shape_of
from mansu.data.templates import Template, get_template, target_texts
from mansu.devices import input_device
from mansu.metrics.accuracy import bootstrap_ci, check_context, check_lengths, check_records_fit, mcq_accuracy

METRIC_NAMES = {"mcq": "accuracy", "qa": "answer token accuracy", "text": "next-token accuracy"}


def encode_target(tokenizer: Any, record: Record, template: Template) -> tuple[list[int], int]:
    """(token ids, first scored position) of one QA or text record: context with the tokenizer's special prefix,
    target without it (as lm-eval tokenizes); a text record is encoded whole and scored after its first token."""
    context, target = target_texts(record, template)
    if not context:
        ids = list(tokenizer(target, add_special_tokens=True)["input_ids"])
        return ids, 1
    ctx = list(tokenizer(context, add_special_tokens=True)["input_ids"])
    cont = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not cont:
        raise ValueError(f"answer {target!r} encodes to no tokens")
    return ctx + cont, len(ctx)


def check_renders(records: Sequence[Record], template: str | Template | None = None, *,
                  source: str | None = None) -> None:
    """Every record renders under `template` (string work only: a check before any model is loaded)."""
    tmpl = get_template(template)
    for i, record in enumerate(records):
        target_texts(record, tmpl, where=f"{source}: record {i + 1}" if source else f"record {i + 1}")


def check_fit(tokenizer: Any, limit: int | None, records: Sequence[Record], *, template: str | Template | None = None,
              source: str | None = None) -> None:
    """Every record of any shape fits the model's context (the preflight check, without a model)."""
    tmpl = get_template(template)
    if records and isinstance(records[0], MCQRecord):
        check_records_fit(tokenizer, limit, records, template=tmpl, source=source)  # type: ignore[arg-type]
        return
    check_lengths(limit, [len(encode_target(tokenizer, r, tmpl)[0]) for r in records], owners=range(len(records)),
                  source=source)


def token_logprobs(model: Any, sequences: Sequence[tuple[list[int], int]], *, batch_size: int = 64,
                   source: str | None = None) -> list[tuple[Any, Any]]:
    """(log p of each scored token, whether it is the top-1 next token) of each (ids, start) sequence, teacher
    forced: two CPU tensors of len(ids) - start per sequence."""
    import torch

    check_context(model, [len(ids) for ids, _ in sequences], owners=range(len(sequences)), source=source)
    device = input_device(model)
    out = []
    for first in range(0, len(sequences), batch_size):
        chunk = sequences[first:first + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (seq, _) in enumerate(chunk):
            ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        logp = torch.log_softmax(logits, dim=-1)  # [batch, seq, vocab]
        for i, (seq, start) in enumerate(chunk):
            pos = torch.arange(start - 1, len(seq) - 1)
            tokens = torch.tensor(seq[start:])
            out.append((logp[i, pos, tokens], logits[i, pos].argmax(-1) == tokens))
    return out


def token_stats(model: Any, sequences: Sequence[tuple[list[int], int]], *, batch_size: int = 64,
                source: str | None = None) -> list[tuple[float, int, int]]:
    """(sum of log p, number of scored tokens, number that are top-1) of each (ids, start) sequence, teacher forced."""
    return [(lp.sum().item(), len(lp), int(top.sum()))
            for lp, top in token_logprobs(model, sequences, batch_size=batch_size, source=source)]


def score_records(model: Any, tokenizer: Any, records: Sequence[Record], *, template: str | Template | None = None,
                  batch_size: int = 64, n_boot: int = 1000, seed: int = 0, source: str | None = None) -> dict[str, Any]:
    """The scores of one split (see the module docstring), as stored in metrics.json."""
    if not records:
        raise ValueError("empty split: scoring needs at least one record")
    tmpl = get_template(template)
    shape = shape_of(list(records))
    if shape == "mcq":
        result = mcq_accuracy(model, tokenizer, records, template=tmpl, batch_size=batch_size,  # type: ignore[arg-type]
                              n_boot=n_boot, seed=seed, source=source)
        chance = sum(1 / len(r.choices) for r in records) / len(records)  # type: ignore[union-attr]
        return {**result.to_dict(), "shape": shape, "metric": METRIC_NAMES[shape], "chance": chance}
    stats = token_stats(model, [encode_target(tokenizer, r, tmpl) for r in records], batch_size=batch_size,
                        source=source)
    token_acc = [top / n for _, n, top in stats]
    lo, hi = bootstrap_ci(token_acc, n_boot=n_boot, seed=seed)
    out = {"accuracy": sum(token_acc) / len(token_acc), "ci_low": lo, "ci_high": hi, "n": len(stats),
           "loss": sum(-lp / n for lp, n, _ in stats) / len(stats),
           "exact_match": sum(top == n for _, n, top in stats) / len(stats),
           "shape": shape, "metric": METRIC_NAMES[shape], "correct": token_acc}
    return {**out, "template": tmpl.name} if shape == "qa" else out
