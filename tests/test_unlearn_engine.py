"""The unlearning loop and baselines on tiny random Llamas: stats, masks, single writer, faults, config checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mansu.data.records import MCQRecord
from mansu.unlearn.config import UnlearnConfig
from mansu.unlearn.data import encode_records
from mansu.unlearn.engine import EmptyCircuitError, FloorNotMetError, NonFiniteLossError, run_unlearning
from mansu.unlearn.floor import verify_code_changes
from mansu.unlearn.methods import METHODS
from mansu.unlearn.params import quantizable_names

WORDS = ["Zorb", "Quil", "Marn", "Tesk", "Vory", "Plim", "red", "blue", "green", "amber", "Where", "is", "from", "?"]


def _records(n: int, offset: int = 0) -> list[MCQRecord]:
    names, colors = WORDS[:6], WORDS[6:10]
    return [MCQRecord(f"Where is {names[(i + offset) % 6]} from ?", tuple(colors), (i + offset) % 4) for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    from mansu.models.demo import build_tokenizer
    from mansu.testing import tiny_llama

    tok = build_tokenizer([" ".join(WORDS) + " Answer :"])
    model = tiny_llama(vocab_size=len(tok), layers=2, hidden=64, heads=4)
    forget = encode_records(tok, _records(8))
    retain = encode_records(tok, _records(12, offset=3))
    return model, tok, forget, retain


def _run(tiny, masks=None, **kw):
    model, _, forget, retain = tiny
    m = copy.deepcopy(model)
    cfg = UnlearnConfig(**{"steps": 2, "batch_size": 4, "k": 4, "n_fisher": 6, **kw})
    return m, run_unlearning(m, forget, retain, cfg, masks=masks)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_reports_stats(tiny, method):
    model, res = _run(tiny, method=method, lr=1e-3, sure_lr=1e-3, update_fraction=0.05)
    assert len(res.steps) == 2
    for key in ("step", "loss", "grad_norm", "proj_removed_norm", "update_norm", "n_nonzero", "step_seconds"):
        assert key in res.steps[0], (method, key)
    assert res.summary["n_params_touched"] > 0, method
    base = dict(tiny[0].named_parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, base[n])}
    assert changed <= set(quantizable_names(model)), method           # only Linear weights (not head, norms)
    if method == "rmu":
        assert all("down_proj" in n for n in changed)


def test_mansu_is_sparse_floored_and_inside_the_budget(tiny):
    model, res = _run(tiny, method="mansu", update_fraction=0.02, epsilon=1e6)
    last = res.steps[-1]
    assert last["n_floored"] > 0 and last["budget_used"] <= 1.0
    assert last["proj_removed_norm"] > 0                                  # the projection did something
    base = dict(tiny[0].named_parameters())
    new = dict(model.named_parameters())
    touched = {n: (new[n] != base[n]) for n in res.index.names}
    counts = verify_code_changes({n: base[n] for n in touched}, {n: new[n] for n in touched}, touched)
    assert counts["changed"] == res.summary["n_params_touched"] and counts["unchanged"] == 0
    assert counts["collateral"] == 0
    assert res.summary["n_params_touched"] < 0.1 * res.index.numel       # sparse


def test_fisher_budget_limits_mansu(tiny):
    _, loose = _run(tiny, method="mansu", update_fraction=0.05, epsilon=1e6)
    fisher_cost = loose.steps[-1]["fisher_cost"]
    _, bounded = _run(tiny, method="mansu", update_fraction=0.05, epsilon=fisher_cost / 4)
    assert bounded.steps[-1]["fisher_cost"] <= fisher_cost / 4 + 1e-12
    assert bounded.summary["n_params_touched"] < loose.summary["n_params_touched"]
    assert sum(s["n_dropped"] for s in bounded.steps) > 0


def test_circuit_masks_restrict_mansu(tiny):
    model = tiny[0]
    name = "model.layers.1.mlp.down_proj.weight"
    p = dict(model.named_parameters())[name]
    mask = torch.zeros_like(p, dtype=torch.bool)
    mask[:, :16] = True
    m, res = _run(tiny, masks={name: mask}, method="mansu", update_fraction=0.2, epsilon=1e6)
    base = dict(model.named_parameters())
    for n, q in m.named_parameters():
        if n != name:
            assert torch.equal(q, base[n]), n
    diff = dict(m.named_parameters())[name] != p
    assert bool(diff.any()) and not bool(diff[~mask].any())


def test_sure_mask_really_applies(tiny):
    """Gradients (and updates) outside the saliency mask are zero: <= 10% of rows change."""
    model, _, forget, retain = tiny
    m = copy.deepcopy(model)
    cfg = UnlearnConfig(method="sure", steps=1, batch_size=4, sure_lr=1e-3)
    sure = METHODS["sure"]
    index = sure.coordinates(m, cfg, None)
    method = sure(m, forget, retain, cfg, index)
    method.prepare()
    delta, stats = method.step(0)
    rows = {n: d.reshape(d.shape[0], -1) for n, d in index.scatter(delta).items()}
    changed = sum(int((r != 0).any(dim=1).sum()) for r in rows.values())
    total = sum(r.shape[0] for r in rows.values())
    assert 0 < changed <= math.ceil(0.1 * total) + 1
    assert stats["n_masked"] < index.numel // 5


def test_nan_loss_stops_before_applying(tiny):
    model, _, forget, retain = tiny
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.norm.weight.fill_(float("nan"))  # test setup: poison the final norm
    before = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(NonFiniteLossError) as err:
        run_unlearning(m, forget, retain, UnlearnConfig(method="graddiff", steps=3, batch_size=4))
    assert err.value.step == 0
    assert all(torch.equal(p, before[n]) or n == "model.norm.weight" for n, p in m.named_parameters())


def test_empty_circuit_and_unmeetable_floor_give_numbers(tiny):
    with pytest.raises(EmptyCircuitError, match="empty circuit.*0 quantizable"):
        _run(tiny, masks={"model.norm.weight": torch.ones(64, dtype=torch.bool)}, method="mansu")
    with pytest.raises(FloorNotMetError, match=r"cheapest floored move .* > epsilon=1e-20"):
        _run(tiny, method="mansu", epsilon=1e-20)


@pytest.mark.parametrize("bad", [{"method": "nope"}, {"steps": 0}, {"lr": -1.0}, {"kappa": 0}, {"kappa": 100.0},
                                 {"epsilon": 0.0}, {"k": 0}, {"update_fraction": 1.5}, {"blocksize": 63},
                                 {"objective": "kl"}, {"sure_percentile": 100.0}, {"lr": float("nan")}])
def test_config_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        UnlearnConfig(**bad)


def test_config_round_trip_and_unknown_keys():
    cfg = UnlearnConfig(method="npo", steps=3, epsilon=math.inf)
    assert UnlearnConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown unlearning setting"):
        UnlearnConfig.from_dict({"stepz": 3})


@pytest.mark.parametrize("selection", ["gradient", "fisher_ratio"])
def test_mansu_chunked_candidate_score_equals_the_whole_one(tiny, selection, monkeypatch):
    # at 8B MANSU's candidate score is never held whole (a ChunkedScore through the radix selection); forcing that
    # path on a tiny model gives bit for bit the run of the whole-score torch.topk path
    from mansu.unlearn.methods import base

    kw = {"method": "mansu", "steps": 3, "update_fraction": 0.05, "selection": selection}
    _, whole = _run(tiny, **kw)
    monkeypatch.setattr(base, "TOPK_DIRECT", 100)
    monkeypatch.setattr(base, "SELECT_CHUNK", 1000)
    _, chunked = _run(tiny, **kw)
    assert whole.summary["n_params_touched"] > 0 and whole.index.numel > 10 * base.SELECT_CHUNK
    assert torch.equal(chunked.delta, whole.delta)
    drop = ("step_seconds",)
    assert [{k: v for k, v in s.items() if k not in drop} for s in chunked.steps] == \
        [{k: v for k, v in s.items() if k not in drop} for s in whole.steps]
