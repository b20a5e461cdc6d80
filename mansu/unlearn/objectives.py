"""Unlearning objectives (losses to minimise), each a few lines on sequence log-likelihoods.

With log p_theta(y|x) summed over target tokens and |y| the target length:
    GA:       L = mean log p_theta(y|x)                                   (gradient ascent on the NLL)
    NLL:      L = -mean log p_theta(y|x)                                  (retain term)
    GradDiff: L = GA(forget) + w * NLL(retain)
    NPO:      L = -(2/beta) mean log sigmoid(-beta (log p_theta - log p_ref))      (Zhang et al. 2024)
    SimNPO:   L = -(2/beta) mean log sigmoid(-(beta/|y|) log p_theta - gamma)     (Fan et al. 2024)
    RMU:      L = mean ||h_l(forget) - c u||^2 + alpha mean ||h_l(retain) - h_l^frozen(retain)||^2   (Li et al. 2024)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mansu.unlearn.data import TokenBatch


def sequence_logprobs(model, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target-token log-probs [batch], number of target tokens [batch])."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logp = F.log_softmax(logits[:, :-1], dim=-1)  # [batch, seq-1, vocab]
    labels = batch.labels[:, 1:]
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return tok.sum(dim=1), mask.sum(dim=1)


def nll_loss(model, batch: TokenBatch) -> torch.Tensor:
    lp, n = sequence_logprobs(model, batch)
    return -(lp / n.clamp(min=1)).mean()


def ga_loss(model, batch: TokenBatch) -> torch.Tensor:
    return -nll_loss(model, batch)


def npo_loss(model, batch: TokenBatch, ref_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    lp, _ = sequence_logprobs(model, batch)
    return -(2.0 / beta) * F.logsigmoid(-beta * (lp - ref_logprobs)).mean()


def simnpo_loss(model, batch: TokenBatch, beta: float, gamma: float) -> torch.Tensor:
    lp, n = sequence_logprobs(model, batch)
    return -(2.0 / beta) * F.logsigmoid(-(beta / n.clamp(min=1)) * lp - gamma).mean()


@torch.no_grad()
def reference_logprobs(model, batch: TokenBatch, chunk: int = 256) -> torch.Tensor:
    """log p_ref(y|x) of every sequence under the model as it is now (NPO's frozen reference)."""
    out = [sequence_logprobs(model, batch.select(range(i, min(i + chunk, len(batch)))))[0]
           for i in range(0, len(batch), chunk)]
    return torch.cat(out).detach()


def hidden_at(model, batch: TokenBatch, layer: int) -> torch.Tensor:
    """Hidden state after decoder layer `layer` [batch, seq, d] (hidden_states[layer + 1])."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return out.hidden_states[layer + 1]


def rmu_loss(model, forget: TokenBatch, retain: TokenBatch, layer: int, control: torch.Tensor,
             frozen_retain_hidden: torch.Tensor, alpha: float) -> torch.Tensor:
    hf = hidden_at(model, forget, layer)
    hr = hidden_at(model, retain, layer)
    mf = forget.attention_mask.unsqueeze(-1).float()
    mr = retain.attention_mask.unsqueeze(-1).float()
    forget_term = (((hf - control) ** 2).mean(-1, keepdim=True) * mf).sum() / mf.sum()
    retain_term = (((hr - frozen_retain_hidden) ** 2).mean(-1, keepdim=True) * mr).sum() / mr.sum()
    return forget_term + alpha * retain_term
