"""The changes CAD and its split were calibrated on (mansu.attribution.cad_parts' docstring): an output-level
suppression that leaves every internal computation alone, realistic suppressions that fine-tune only the readout,
and a structural erasure of the circuit's top components. Each `CASES` entry changes a *copy* of a small model
(the demo; never call it on a model you cannot copy) so that it stops giving its forget answers.

`case_table` attributes each changed model on the same records and returns, per case, the forget accuracy and
every CAD part pooled and per fact with its 95% CI: `python scripts/cad_cases.py` prints it for the demo model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from mansu.attribution.cad import cad
from mansu.attribution.circuit import Circuit
from mansu.attribution.eap import AttributionGraph, attribute
from mansu.models.hooks import hooks


def answer_bias(model, tokenizer, records, value: float = -30.0) -> torch.Tensor:
    """A logit bias of `value` on the first token of every record's answer, [vocab]."""
    answers = {tokenizer(" " + r.choices[r.answer], add_special_tokens=False)["input_ids"][0] for r in records}
    bias = torch.zeros(model.config.vocab_size)
    bias[sorted(answers)] = value
    return bias


def avoid_answers(model, tokenizer, records, params, *, steps: int = 5, lr: float = 1e-2) -> None:
    """Adam on `params` only, lowering each record's answer share of the softmax over its choices' first tokens."""
    from mansu.metrics.accuracy import encode_pair, format_texts

    items = []
    for r in records:
        context, continuations = format_texts(r, "cloze")
        pairs = [encode_pair(tokenizer, context, c) for c in continuations]
        items.append((torch.tensor([pairs[0][0]]), [cont[0] for _, cont in pairs], r.answer))
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = sum(torch.log_softmax(model(ids).logits[0, -1, choices], -1)[answer] for ids, choices, answer in items)
        opt.zero_grad()
        (loss / len(items)).backward()
        opt.step()


def fine_tuned(model, tokenizer, records, pick: Callable[[Any], list[torch.nn.Parameter]]):
    """A copy of `model` in which only the parameters `pick(copy)` learned to avoid the records' answers."""
    changed = copy.deepcopy(model).requires_grad_(False)
    params = pick(changed)
    for p in params:
        p.requires_grad_(True)
    avoid_answers(changed, tokenizer, records, params)
    return changed.requires_grad_(False)


def top_components(graph: AttributionGraph, circuit: Circuit, k: int = 3) -> list[str]:
    """The circuit's k inner nodes with the most |attribution| on their circuit edges."""
    inner = [n for n in circuit.nodes if n not in ("input", "logits")]
    scores = {n: sum(abs(graph.score(u, v)) for u, v in circuit.edges if n in (u, v)) for n in inner}
    return sorted(inner, key=lambda n: -scores[n])[:k]


def zeroed(model, nodes: Sequence[str]):
    """A copy of a Llama-layout `model` whose `nodes` (a{L}.h{H}, m{L}) no longer write into the residual stream."""
    changed = copy.deepcopy(model)
    head_dim = changed.config.hidden_size // changed.config.num_attention_heads
    with torch.no_grad():
        for node in nodes:
            if node.startswith("a"):
                layer, head = map(int, node[1:].split(".h"))
                changed.model.layers[layer].self_attn.o_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
            else:
                changed.model.layers[int(node[1:])].mlp.down_proj.weight.zero_()
    return changed


CASES = ("answer-logit bias -30", "unembedding fine-tuned", "last MLP fine-tuned", "last layer + norm fine-tuned",
         "top 3 circuit components zeroed")


def case_table(model, tokenizer, records, graph: AttributionGraph, circuit: Circuit, *, ig_steps: int = 8,
               n_boot: int = 500) -> list[dict[str, Any]]:
    """Per case of CASES: its forget accuracy and CAD's parts pooled and per fact ({part: {value, ci_low,
    ci_high}}), against `graph` (the model's own, per example, on `records`)."""
    from mansu.metrics.accuracy import mcq_accuracy

    def measure(name: str, changed, context=None) -> dict[str, Any]:
        with context or nullcontext():
            acc = mcq_accuracy(changed, tokenizer, records).accuracy
            after = attribute(changed, tokenizer, records, ig_steps=ig_steps, batch_size=32, per_example=True)
        r = cad(graph, after, circuit, n_boot=n_boot)
        return {"case": name, "forget_accuracy": acc, "pooled": r.parts, "per_fact": r.per_fact}

    bias = answer_bias(model, tokenizer, records)
    return [
        measure(CASES[0], model, hooks([(model.lm_head, "forward", lambda m, a, out: out + bias, False)])),
        measure(CASES[1], fine_tuned(model, tokenizer, records, lambda m: [m.lm_head.weight])),
        measure(CASES[2], fine_tuned(model, tokenizer, records, lambda m: list(m.model.layers[-1].mlp.parameters()))),
        measure(CASES[3], fine_tuned(model, tokenizer, records, lambda m: [*m.model.layers[-1].parameters(),
                                                                            *m.model.norm.parameters()])),
        measure(CASES[4], zeroed(model, top_components(graph, circuit))),
    ]
