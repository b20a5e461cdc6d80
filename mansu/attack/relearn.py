"""Relearning attacks on a run's unlearned model, and its durability certificate (issue 14 item 5).

One protocol for every method (the settings are AttackConfig's; nothing depends on the method):

    relearn            fine-tune every parameter of the unlearned model (AdamW, lr) for `steps` steps on M forget
                       records, spread evenly over the run's forget training split
    relearn-unrelated  the same on M unrelated records (the run's retain training split, or --unrelated FILE):
                       does forgetting come back from any fine-tuning, not only from the forgotten data?
    quantize-relearn   QLoRA: the unlearned model's NF4 twin (simulated, bit-exact bitsandbytes round trip, frozen)
                       with a LoRA adapter (mansu.attack.lora) on every quantizable Linear, trained on the M forget
                       records (lora_lr)

Every `eval_every` steps (and at step 0, the unlearned model) the forget and retain accuracy are scored with the
run's own scoring (mansu.metrics.scoring, the run's template, its forget-eval and retain-eval sets).  Forget
questions the attacker trained on are marked, so the summary can be read on held-out questions (relearning the
rest from a few is the attack; answering the ones trained on is memorisation).

    recovered fraction = (acc_attacked - acc_unlearned) / (acc_base - acc_unlearned)

0: nothing came back, 1: back to the base.  Per question vectors of the three models are resampled together
(percentile bootstrap, 95%); resamples where the base is not above the unlearned model are dropped (the ratio has
no meaning there).  acc_base is the run's base evaluation (metrics.json), in fp or under the quantizer; after
relearn and relearn-unrelated the attacked model is also scored under every grid quantizer of the run (the attacker
deploys the model quantized), quantize-relearn is NF4 by construction.  Memory: the rebuilt model plus AdamW's two
moments (8 B per trained parameter in fp32), or for quantize-relearn the adapters (mansu.attack.lora).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from mansu.io import read_checked, write_checked
from mansu.options import opt, validate
from mansu.runs import layout

log = logging.getLogger(__name__)

AttackKind = Literal["relearn", "relearn-unrelated", "quantize-relearn"]
KINDS: tuple[str, ...] = get_args(AttackKind)
ALL = "all"  # every kind, then certificate.json
CERTIFICATE = layout.CERTIFICATE
FP = "fp"
attack_file = layout.attack_json


@dataclass(frozen=True)
class AttackConfig:
    steps: int = opt(20, "fine-tuning steps of the attacker", lo=1, hi=100_000)
    records: int = opt(16, "M: records the attacker fine-tunes on (forget records, or unrelated ones)", lo=1)
    eval_every: int = opt(5, "score the forget and retain sets every this many steps (and at 0 and the end)", lo=1)
    lr: float = opt(1e-4, "AdamW learning rate of full fine-tuning (relearn, relearn-unrelated)", lo=0.0, lo_open=True)
    lora_lr: float = opt(1e-3, "AdamW learning rate of the LoRA adapter (quantize-relearn)", lo=0.0, lo_open=True)
    lora_rank: int = opt(8, "LoRA rank r (alpha = 2 r, QLoRA's ratio)", lo=1, hi=4096)
    batch_size: int = opt(8, "records per step", lo=1)
    retain_records: int = opt(200, "retain-eval records scored at each point (the first N)", lo=1)
    unrelated: str = opt("", "records file relearn-unrelated trains on (default: the run's retain training split)")
    seed: int = opt(0, "seed of the batch order and the adapter's init", lo=0)

    def __post_init__(self) -> None:
        validate(self)


def check_kind(kind: str) -> str:
    if kind not in (*KINDS, ALL):
        raise ValueError(f"unknown attack kind {kind!r}: accepted are {', '.join((*KINDS, ALL))}")
    return kind


# ---------------------------------------------------------------- the records of an attack


@dataclass(frozen=True)
class AttackData:
    train: list         # what the attacker fine-tunes on
    forget: list        # the run's forget-eval records, scored
    held_out: list[int]  # positions in `forget` of questions the attacker did not train on
    retain: list        # the first `retain_records` of the run's retain-eval records


def spread(records: Sequence, m: int) -> list:
    """`m` records spread evenly over the split (files group records by entity)."""
    return list(records[:: max(1, len(records) // m)][:m])


def attack_data(spec: Any, kind: str, cfg: AttackConfig) -> AttackData:
    """The records of `kind` on the run of `spec` (files checked and loaded here, before any model)."""
    from mansu.pipeline import load_split, resolve_inputs

    inputs = resolve_inputs(spec)
    source = inputs.path("forget")
    if kind == "relearn-unrelated":
        source = cfg.unrelated or inputs.path("retain")
        if cfg.unrelated and not Path(cfg.unrelated).is_file():
            raise FileNotFoundError(f"--unrelated {cfg.unrelated}: file not found; give a records file (JSONL, "
                                    "JSON, CSV or Parquet of MCQ, QA or text records)")
    train = spread(load_split(source), cfg.records)
    forget = load_split(inputs.path("forget_eval"))
    trained = set(train) if kind != "relearn-unrelated" else set()
    held_out = [i for i, r in enumerate(forget) if r not in trained]
    return AttackData(train, forget, held_out, load_split(inputs.path("retain_eval"))[: cfg.retain_records])


# ---------------------------------------------------------------- recovered fraction


def recovered_fraction(base: Sequence[float], unlearned: Sequence[float], attacked: Sequence[float], *,
                       n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The recovered fraction (module docstring) on paired per-question scores, with its 95% bootstrap CI; None with
    a reason when the unlearned model is not below the base (nothing was forgotten, nothing to recover)."""
    import torch

    if not (len(base) == len(unlearned) == len(attacked)) or not base:
        raise ValueError("recovered fraction needs the same non-empty questions for base, unlearned and attacked")
    b, u, a = (torch.as_tensor([float(x) for x in v], dtype=torch.float64) for v in (base, unlearned, attacked))
    out = {"acc_base": float(b.mean()), "acc_unlearned": float(u.mean()), "acc_attacked": float(a.mean()),
           "n": len(b), "recovered": None, "ci_low": None, "ci_high": None}
    drop = float(b.mean() - u.mean())
    if drop <= 0:
        return {**out, "reason": f"the unlearned model is not below the base ({drop:+.3f}): nothing to recover"}
    idx = torch.randint(0, len(b), (n_boot, len(b)), generator=torch.Generator().manual_seed(seed))
    num, den = a[idx].mean(1) - u[idx].mean(1), b[idx].mean(1) - u[idx].mean(1)
    ratios = num[den > 0] / den[den > 0]
    return {**out, "recovered": float(a.mean() - u.mean()) / drop,
            "ci_low": float(torch.quantile(ratios, 0.025)), "ci_high": float(torch.quantile(ratios, 0.975))}


def _subset(values: Sequence[float], positions: Sequence[int]) -> list[float]:
    return [values[i] for i in positions]


def summarise(base: Sequence[float], unlearned: Sequence[float], attacked: Sequence[float],
              held_out: Sequence[int]) -> dict[str, Any]:
    """The recovered fraction on the forget questions the attacker did not train on ("held-out"), or on all of them
    ("all") when it trained on every one or on none; "on" says which."""
    on = held_out if held_out else range(len(base))
    result = recovered_fraction(_subset(base, on), _subset(unlearned, on), _subset(attacked, on))
    return {**result, "on": "held-out" if held_out and len(held_out) < len(base) else "all"}


# ---------------------------------------------------------------- the attack loop


Scores = dict[str, dict[str, Any]]  # split -> score_records result


def _point(step: int, loss: float | None, scores: Scores, held_out: list[int]) -> dict[str, Any]:
    forget = scores["forget"]
    held = _subset(forget["correct"], held_out)
    return {"step": step, "loss": loss, "forget": forget["accuracy"], "forget_ci": [forget["ci_low"],
                                                                                   forget["ci_high"]],
            "forget_held_out": sum(held) / len(held) if held else None, "retain": scores["retain"]["accuracy"]}


def relearn_curve(model: Any, params: list, batch: Any, lr: float, cfg: AttackConfig, data: AttackData,
                  evaluate: Callable[[], Scores]) -> tuple[list[dict[str, Any]], Scores, Scores]:
    """Fine-tune `params` of `model` on `batch` (NLL on the targets) for cfg.steps AdamW steps, scoring with
    `evaluate` at 0, every cfg.eval_every steps and at the end: (curve, scores at 0, scores at the end)."""
    import torch

    from mansu.devices import input_device
    from mansu.unlearn.data import batch_indices
    from mansu.unlearn.objectives import nll_loss

    device = input_device(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    first = last = evaluate()
    curve = [_point(0, None, first, data.held_out)]
    for step in range(1, cfg.steps + 1):
        loss = nll_loss(model, batch.select(batch_indices(len(batch), cfg.batch_size, step - 1, cfg.seed)).to(device))
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"attack loss is {loss.item()} at step {step}; lower --lr / --lora-lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last = evaluate()
            curve.append(_point(step, loss.item(), last, data.held_out))
    return curve, first, last


def _scorer(model: Any, tokenizer: Any, data: AttackData, template: str) -> Callable[[], Scores]:
    from mansu.metrics.scoring import score_records

    def evaluate() -> Scores:
        return {split: score_records(model, tokenizer, recs, template=template, batch_size=256, n_boot=200)
                for split, recs in (("forget", data.forget), ("retain", data.retain))}
    return evaluate


def base_correct(metrics: dict[str, Any], precision: str) -> list[float] | None:
    """Per-question forget scores of the run's base in fp or under a quantizer (None when not evaluated)."""
    stage = metrics.get("base_fp") if precision == FP else (metrics.get("base_quant") or {}).get(precision)
    if precision == "nf4" and not stage:
        stage = metrics.get("base_nf4")
    correct = ((stage or {}).get("forget") or {}).get("correct")
    return correct if isinstance(correct, list) else None


def grid_quantizers(spec: Any) -> list[str]:
    """The run's quantizers that have a simulated grid (GPTQ, calibrated, is left out of attacks)."""
    from mansu.quant.alignment import parse_quantizers
    from mansu.quant.registry import QUANTIZERS

    return [q for q in parse_quantizers(spec.quantizers, calibrated=True) if q in QUANTIZERS]


def run_attack(run: Path, kind: AttackKind, cfg: AttackConfig, *, device: str = "cpu") -> dict[str, Any]:
    """Attack the unlearned model of `run` with `kind`; writes attack_<kind>.json and returns it."""
    from mansu.commands.export import rebuild_model
    from mansu.runs.store import read_config, read_metrics
    from mansu.spec import RunSpec
    from mansu.unlearn.data import encode_records

    spec = RunSpec.from_dict(read_config(run)["spec"])
    data = attack_data(spec, kind, cfg)
    lm = rebuild_model(run, device=device)
    template = spec.prompt_template
    batch = encode_records(lm.tokenizer, data.train, template)
    evaluate = _scorer(lm.model, lm.tokenizer, data, template)
    if kind == "quantize-relearn":
        curve, first, last = _qlora_curve(lm.model, batch, cfg, data, evaluate, spec.unlearn.blocksize)
        pairs = {"nf4": (first["forget"]["correct"], last["forget"]["correct"])}
    else:
        curve, pairs = _fp_attack(lm, spec, batch, cfg, data, evaluate)
    out = {"kind": kind, "run_id": Path(run).name, "method": spec.method, "base_alignment": spec.base_alignment,
           "config": asdict(cfg), "precision": "nf4" if kind == "quantize-relearn" else FP,
           "records": {"train": len(data.train), "forget": len(data.forget), "held_out": len(data.held_out),
                       "retain": len(data.retain), "template": template},
           "curve": curve, "summary": _summaries(read_metrics(run), pairs, data.held_out)}
    write_checked(attack_file(run, kind), out, check_attack)
    return out


def _fp_attack(lm: Any, spec: Any, batch: Any, cfg: AttackConfig, data: AttackData,
               evaluate: Callable[[], Scores]) -> tuple[list[dict[str, Any]], dict[str, tuple[list, list]]]:
    """Full fine-tuning: the curve, and {precision: (unlearned, attacked) forget scores} in fp and under each of the
    run's grid quantizers (the attacked model deployed quantized)."""
    from mansu.metrics.scoring import score_records

    def forget_under(q: str) -> list:
        from mansu.quant.twin import quantized

        with quantized(lm.model, q, blocksize=spec.unlearn.blocksize) as twin:
            return score_records(twin.model, lm.tokenizer, data.forget, template=spec.prompt_template,
                                 batch_size=256, n_boot=200)["correct"]

    quants = grid_quantizers(spec)
    before = {q: forget_under(q) for q in quants}
    curve, first, last = relearn_curve(lm.model, list(lm.model.parameters()), batch, cfg.lr, cfg, data, evaluate)
    return curve, {FP: (first["forget"]["correct"], last["forget"]["correct"]),
                   **{q: (before[q], forget_under(q)) for q in quants}}


def _summaries(metrics: dict[str, Any], pairs: dict[str, tuple[list, list]],
               held_out: list[int]) -> dict[str, dict[str, Any]]:
    """{precision: recovered fraction} against the run's base evaluation in that precision."""
    out = {}
    for precision, (unlearned, attacked) in pairs.items():
        base = base_correct(metrics, precision)
        if base is None or len(base) != len(unlearned):
            out[precision] = {"recovered": None, "reason": f"no base forget evaluation under {precision} on these "
                                                           "questions in metrics.json"}
        else:
            out[precision] = summarise(base, unlearned, attacked, held_out)
    return out


def _qlora_curve(model: Any, batch: Any, cfg: AttackConfig, data: AttackData, evaluate: Callable[[], Scores],
                 blocksize: int) -> tuple[list[dict[str, Any]], Scores, Scores]:
    """relearn_curve on the NF4 twin (frozen round-trip weights) with a LoRA adapter, as QLoRA trains."""
    from mansu.attack.lora import lora
    from mansu.quant.twin import quantized

    with quantized(model, "nf4", blocksize=blocksize), \
            lora(model, rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank, seed=cfg.seed) as adapters:
        return relearn_curve(model, adapters, batch, cfg.lora_lr, cfg, data, evaluate)


# ---------------------------------------------------------------- files


def check_attack(data: Any, where: str = "attack file") -> dict[str, Any]:
    """`data` as an attack file, or a ValueError naming the first field of the wrong shape."""
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        raise ValueError(f"{where}: must be an object whose 'kind' is one of {', '.join(KINDS)}")
    curve = data.get("curve")
    if not isinstance(curve, list) or not all(isinstance(p, dict) and isinstance(p.get("step"), int) and
                                              isinstance(p.get("forget"), (int, float)) for p in curve):
        raise ValueError(f"{where}: 'curve' must be a list of objects with an integer 'step' and a number 'forget'")
    if not isinstance(data.get("summary"), dict):
        raise ValueError(f"{where}: 'summary' must be an object of precision -> recovered fraction")
    return data


def read_attack(run: Path, kind: str) -> dict[str, Any] | None:
    """attack_<kind>.json of a run (None when not written); a wrong shape raises ValueError naming the field."""
    return read_checked(attack_file(run, kind), check_attack)


def read_attacks(run: Path) -> dict[str, dict[str, Any]]:
    """{kind: attack file} of the attacks a run has (unreadable files left out, with a warning)."""
    out = {}
    for kind in KINDS:
        try:
            data = read_attack(run, kind)
        except (OSError, ValueError) as exc:
            log.warning("%s", exc)
            continue
        if data is not None:
            out[kind] = data
    return out


def certificate(run: Path, attacks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The durability certificate: per attack and per precision (fp, each quantizer), the recovered fraction with
    its 95% CI, and the protocol it was measured with."""
    first = next(iter(attacks.values()))
    return {"run_id": Path(run).name, "method": first["method"], "base_alignment": first["base_alignment"],
            "protocol": first["config"], "records": {k: a["records"] for k, a in attacks.items()},
            "attacks": {kind: {p: {k: s.get(k) for k in ("recovered", "ci_low", "ci_high", "acc_base",
                                                         "acc_unlearned", "acc_attacked", "n", "on", "reason")
                                   if k in s}
                               for p, s in a["summary"].items()} for kind, a in attacks.items()}}


def write_certificate(run: Path, attacks: dict[str, dict[str, Any]]) -> Path:
    return write_checked(Path(run) / CERTIFICATE, certificate(run, attacks), _check_certificate)


def _check_certificate(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or not isinstance(data.get("attacks"), dict):
        raise ValueError(f"{where}: must be an object with 'attacks'")
    return data
