"""Forget/retain records -> token batches with a loss mask on the target tokens (mansu.data.templates.target_texts):

    MCQ  (question, choices, answer): context template(question, choices), target the correct choice's continuation
         (default template cloze-answer: "question\\nAnswer:" + " <correct choice>", the cloze line the demo model
         learned and the cloze evaluation scores)
    QA   (question, answer):          context template(question), target " <answer>"
    text (text):                       no context, every token after the first is a target

labels = -100 outside the target, so sequence log-likelihoods and NLLs count the target tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mansu.data.templates import Template, get_template, target_texts


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor       # [batch, seq] long
    attention_mask: torch.Tensor  # [batch, seq] long
    labels: torch.Tensor          # [batch, seq] long, -100 where not scored

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def select(self, idx: Sequence[int]) -> TokenBatch:
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        return TokenBatch(self.input_ids[ix], self.attention_mask[ix], self.labels[ix])


def record_texts(record, template: str | Template | None = None) -> tuple[str, str]:
    """(context, target) of one record (see the module docstring)."""
    return target_texts(record, template)


def encode_records(tokenizer, records: Sequence, template: str | Template | None = None) -> TokenBatch:
    """All records as one right-padded batch (the demo's sequences are short; callers slice it)."""
    if not records:
        raise ValueError("empty split: unlearning needs at least one forget and one retain record")
    tmpl = get_template(template)
    seqs, starts = [], []
    for record in records:
        context, target = record_texts(record, tmpl)
        ctx = tokenizer(context, add_special_tokens=True)["input_ids"] if context else []
        tgt = tokenizer(target, add_special_tokens=not context)["input_ids"]
        seqs.append(ctx + tgt)
        starts.append(max(len(ctx), 1))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, start: len(s)] = ids[i, start: len(s)]
    return TokenBatch(ids, mask, labels)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The example indices of `step`: a fresh permutation per epoch, deterministic in (seed, epoch)."""
    per_epoch = max(1, -(-n // batch_size))
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    return order[pos * batch_size: (pos + 1) * batch_size] or order[:batch_size]
