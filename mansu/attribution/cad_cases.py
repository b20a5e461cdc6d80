"""The changes CAD and its split were calibrated on (mansu.attribution.cad_parts' docstring): an output-level
suppression that leaves every internal computation alone, realistic suppressions that fine-tune only the readout,
and a structural erasure of the circuit's top components. Each `CASES` entry changes the model in place inside a
`with` block so that it stops giving its forget answers, and puts back exactly what it changed on exit (a copy of
the changed parameters only: the unembedding, or one layer).

`case_table` attributes each changed model on the same records and returns, per case, the forget accuracy and
every CAD part pooled and per fact with its 95% CI: `python scripts/cad_cases.py` prints it for the demo model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
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


@contextlib.contextmanager
def restored(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Put `params`' values and requires_grad flags back on exit (a copy of those parameters only)."""
    saved = [(p.detach().clone(), p.requires_grad) for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, (value, flag) in zip(params, saved):
                p.copy_(value)
                p.requires_grad_(flag)


@contextlib.contextmanager
def fine_tuned(model, tokenizer, records, pick: Callable[[Any], list[torch.nn.Parameter]]) -> Iterator[Any]:
    """`model` in which only the parameters `pick(model)` learned to avoid the records' answers, inside the block;
    those parameters are put back on exit (no model copy)."""
    params = pick(model)
    with restored(params):
        frozen = {p: p.requires_grad for p in model.parameters()}
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        try:
            avoid_answers(model, tokenizer, records, params)
            model.requires_grad_(False)
            yield model
        finally:
            for p, flag in frozen.items():
                p.requires_grad_(flag)


def top_components(graph: AttributionGraph, circuit: Circuit, k: int = 3) -> list[str]:
    """The circuit's k inner nodes with the most |attribution| on their circuit edges."""
    inner = [n for n in circuit.nodes if n not in ("input", "logits")]
    scores = {n: sum(abs(graph.score(u, v)) for u, v in circuit.edges if n in (u, v)) for n in inner}
    return sorted(inner, key=lambda n: -scores[n])[:k]


@contextlib.contextmanager
def zeroed(model, nodes: Sequence[str]) -> Iterator[Any]:
    """A Llama-layout `model` whose `nodes` (a{L}.h{H}, m{L}) no longer write into the residual stream, inside the
    block; the weights are put back on exit (no model copy)."""
    layers = model.model.layers
    touched = [layers[int(n[1:].split(".h")[0])].self_attn.o_proj.weight if n.startswith("a")
               else layers[int(n[1:])].mlp.down_proj.weight for n in nodes]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with restored(touched):
        with torch.no_grad():
            for node, weight in zip(nodes, touched):
                if node.startswith("a"):
                    head = int(node.split(".h")[1])
                    weight[:, head * head_dim:(head + 1) * head_dim] = 0
                else:
                    weight.zero_()
        yield model


CASES = ("answer-logit bias -30", "unembedding fine-tuned", "last MLP fine-tuned", "last layer + norm fine-tuned",
         "top 3 circuit components zeroed")


def case_table(model, tokenizer, records, graph: AttributionGraph, circuit: Circuit, *, ig_steps: int = 8,
               n_boot: int = 500) -> list[dict[str, Any]]:
    """Per case of CASES: its forget accuracy and CAD's parts pooled and per fact ({part: {value, ci_low,
    ci_high}}), against `graph` (the model's own, per example, on `records`)."""
    from mansu.metrics.accuracy import mcq_accuracy

    def measure(name: str, context) -> dict[str, Any]:
        with context as changed:
            acc = mcq_accuracy(changed, tokenizer, records).accuracy
            after = attribute(changed, tokenizer, records, ig_steps=ig_steps, batch_size=32, per_example=True)
        r = cad(graph, after, circuit, n_boot=n_boot)
        return {"case": name, "forget_accuracy": acc, "pooled": r.parts, "per_fact": r.per_fact}

    return [
        measure(CASES[0], _biased(model, answer_bias(model, tokenizer, records))),
        measure(CASES[1], fine_tuned(model, tokenizer, records, lambda m: [m.lm_head.weight])),
        measure(CASES[2], fine_tuned(model, tokenizer, records, lambda m: list(m.model.layers[-1].mlp.parameters()))),
        measure(CASES[3], fine_tuned(model, tokenizer, records, lambda m: [*m.model.layers[-1].parameters(),
                                                                            *m.model.norm.parameters()])),
        measure(CASES[4], zeroed(model, top_components(graph, circuit))),
    ]


@contextlib.contextmanager
def _biased(model, bias: torch.Tensor) -> Iterator[Any]:
    """`model` with `bias` added to its output logits, inside the block."""
    with hooks([(model.lm_head, "forward", lambda module, args, out: out + bias, False)]):
        yield model
