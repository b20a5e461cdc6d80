"""Token-level view: captum's LayerIntegratedGradients on the input embeddings, cross-checked against EAP-IG.

For each example, token attribution at position p is

    A_p = (emb_clean[p] - emb_corrupt[p]) . (1/m) sum_k dM/d emb[p] |_{e_k}

(captum's ``riemann_middle`` rule from the corrupted prompt as baseline to the clean prompt: the same midpoint
points alpha_k = (k - 1/2)/m that `mansu.attribution.eap` uses). The input stream entering layer 0 is an affine
function of the embedding output with the same difference (position embeddings cancel; Gemma's sqrt(d) scale
multiplies the difference and divides the gradient), so

    sum_p A_p  =  - sum_v score_i(input -> v)                      (per example i)

up to float error: EAP-IG's ``input -> *`` edges split the same integrated gradient by downstream node instead of
by position. `cross_check` reports the largest relative difference; the tests require it below 1e-3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mansu.attribution.data import Corruption, Metric, metric_values
from mansu.attribution.eap import AttributionGraph, prepare
from mansu.models.hooks import differentiable_4bit


@dataclass
class TokenAttribution:
    tokens: list[list[str]]         # per example, the clean prompt's tokens
    scores: list[list[float]]       # per example, A_p for each real position
    totals: torch.Tensor            # [n] sum_p A_p
    record_indices: list[int]


def token_attributions(model: Any, tokenizer: Any, records: Sequence[Any], *, ig_steps: int = 8,
                       metric: Metric = "logit_diff", corruption: Corruption = "counterfactual", batch_size: int = 16,
                       max_records: int | None = 64) -> TokenAttribution:
    """Per-token integrated gradients of the metric between the corrupted and the clean prompt (captum)."""
    from captum.attr import LayerIntegratedGradients

    if corruption != "counterfactual":
        raise ValueError(f"token attributions need token-level baselines: corruption must be 'counterfactual', "
                         f"got {corruption!r}")
    if ig_steps < 2:
        raise ValueError(f"captum's riemann_middle needs ig_steps >= 2, got {ig_steps}")
    prep = prepare(model, tokenizer, records, metric=metric, corruption=corruption, batch_size=batch_size,
                   max_records=max_records)
    tokens, scores, totals = [], [], []
    for batch in prep.batches:
        def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            reps = ids.shape[0] // batch.clean.shape[0]
            expanded = _repeat(batch, reps)
            return metric_values(model(input_ids=ids, attention_mask=mask).logits, expanded, metric)
        lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
        with differentiable_4bit(model):
            attr = lig.attribute(batch.clean, baselines=batch.corrupt, additional_forward_args=(batch.mask,),
                                 n_steps=ig_steps, method="riemann_middle",
                                 internal_batch_size=batch.clean.shape[0])
        per_pos = attr.sum(-1).float().cpu() * batch.mask.cpu()            # [b, s]
        for i in range(per_pos.shape[0]):
            length = int(batch.mask[i].sum())
            tokens.append(tokenizer.convert_ids_to_tokens(batch.clean[i, :length].tolist()))
            scores.append(per_pos[i, :length].tolist())
        totals.append(per_pos.sum(-1))
    return TokenAttribution(tokens, scores, torch.cat(totals), prep.indices)


def _repeat(batch: Any, reps: int) -> Any:
    if reps == 1:
        return batch
    fields = {k: (v.repeat(reps, *([1] * (v.ndim - 1))) if isinstance(v, torch.Tensor) else v)
              for k, v in batch.__dict__.items()}
    return type(batch)(**fields)


def cross_check(tokens: TokenAttribution, graph: AttributionGraph) -> float:
    """Largest |sum_p A_p + sum_v score_i(input -> v)| / max(|sum_p A_p|, 1e-6) over examples (needs per_example)."""
    if graph.per_example is None:
        raise ValueError("cross_check needs a graph computed with attribute(..., per_example=True)")
    if tokens.record_indices != graph.metadata.get("record_indices"):
        raise ValueError("token attributions and graph were computed on different records")
    eap = graph.per_example[:, 0, :].sum(-1)
    return float(((tokens.totals + eap).abs() / tokens.totals.abs().clamp(min=1e-6)).max())
