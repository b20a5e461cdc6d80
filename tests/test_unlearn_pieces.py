"""MANSU's pieces on pure tensors: projection, Fisher bound, magnitude floor (checked with real bitsandbytes)."""

from __future__ import annotations

import math

import pytest
import torch

from mansu.unlearn.fisher import bound_clip, bound_scale, fisher_cost
from mansu.unlearn.floor import floor_geometry, floor_update, preview_floor, verify_code_changes
from mansu.unlearn.params import index_from_masks
from mansu.unlearn.projection import orthonormal_basis, project_off, restrict


def test_projection_orthogonal_idempotent():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(6, 500, generator=gen)
    G[5] = G[0] + 2 * G[1]  # rank-deficient: the basis drops the dependent row
    Q = orthonormal_basis(G)
    assert Q.shape == (500, 5)
    assert torch.allclose(Q.T @ Q, torch.eye(5), atol=1e-5)
    g = torch.randn(500, generator=gen)
    p = project_off(g, Q)
    assert (G @ p).abs().max() < 1e-3 * g.norm()              # orthogonal to every retain gradient
    assert torch.allclose(project_off(p, Q), p, atol=1e-5)    # idempotent
    assert p.norm() < g.norm()                                # something was removed


def test_restrict_is_zero_outside_mask_and_index_round_trips():
    w = {"a": torch.randn(4, 8), "b": torch.randn(3)}
    masks = {"a": torch.rand(4, 8) > 0.5, "b": torch.tensor([True, False, True])}
    r = restrict(w, masks)
    assert bool((r["a"][~masks["a"]] == 0).all()) and bool((r["b"][~masks["b"]] == 0).all())
    idx = index_from_masks(masks)
    flat = idx.gather(w)
    assert flat.numel() == int(masks["a"].sum() + masks["b"].sum())
    back = idx.scatter(flat)
    assert torch.equal(back["a"], r["a"]) and torch.equal(back["b"], r["b"])
    # projection in the flat circuit space never touches what the mask leaves out
    Q = orthonormal_basis(torch.randn(2, flat.numel()))
    dense = idx.scatter(project_off(flat, Q))
    assert bool((dense["a"][~masks["a"]] == 0).all())


def test_fisher_scale_bound_holds():
    gen = torch.Generator().manual_seed(1)
    F = torch.rand(1000, generator=gen)
    d = torch.randn(1000, generator=gen)
    assert fisher_cost(d, F) > 0.1
    out = bound_scale(d, F, 0.1)
    assert fisher_cost(out.delta, F) <= 0.1 and out.budget_used == pytest.approx(1.0, rel=1e-5)
    inside = bound_scale(d * 1e-3, F, 0.1)
    assert inside.scale == 1.0 and inside.budget_used < 1


def test_fisher_clip_keeps_priority_prefix_within_budget():
    F = torch.tensor([1.0, 1.0, 1.0, 100.0, 1.0])
    d = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0])
    res = bound_clip(d, F, epsilon=1.6, priority=torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]))
    # costs 0.5 each: three fit (1.5), then the expensive one ends the prefix
    assert res.delta.tolist() == [1.0, -1.0, 1.0, 0.0, 0.0]
    assert res.n_dropped == 2 and fisher_cost(res.delta, F) <= 1.6
    spent = bound_clip(d, F, epsilon=1.6, priority=torch.arange(5.0).flip(0), spent=1.2)
    assert int((spent.delta != 0).sum()) == 0 and spent.n_dropped == 5


def _weights(seed=0, shape=(64, 128)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("kappa", [0.05, 1.0, 2.5])
def test_floor_changes_every_code_under_real_bitsandbytes(kappa):
    import bitsandbytes.functional as bnbF

    w = _weights()
    idx = index_from_masks({"w": torch.ones_like(w, dtype=torch.bool)})
    geo = floor_geometry({"w": w}, idx)
    gen = torch.Generator().manual_seed(3)
    proposal = torch.randn(w.numel(), generator=gen) * 1e-6          # far below any bin width
    proposal[torch.rand(w.numel(), generator=gen) < 0.7] = 0          # a sparse update
    floored, feasible = floor_update(proposal, geo, kappa)
    assert int(feasible.sum()) > 0.25 * w.numel()
    new = w + floored.reshape(w.shape)
    q0, s0 = bnbF.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
    q1, s1 = bnbF.quantize_4bit(new.contiguous(), blocksize=64, quant_type="nf4")
    from mansu.quant.nf4 import unpack_nf4

    c0, c1 = unpack_nf4(q0, w.numel()), unpack_nf4(q1, w.numel())
    moved = floored != 0
    assert bool((c0[moved] != c1[moved]).all())                        # 100% of floored weights changed code
    assert bool((c0[~moved] == c1[~moved]).all())                       # nothing else did
    assert torch.equal(s0.absmax, s1.absmax)                            # no block was rescaled
    up = proposal[moved] > 0
    assert bool(((c1[moved].long() > c0[moved].long()) == up).all())   # in the update's direction
    assert bool((floored[moved].abs() >= kappa * geo.bin_width[moved] * (1 - 1e-6)).all())  # >= kappa bins


def test_floor_skips_absmax_elements_and_edge_cells():
    w = _weights(1, (4, 64))
    idx = index_from_masks({"w": torch.ones_like(w, dtype=torch.bool)})
    geo = floor_geometry({"w": w}, idx)
    flat = w.reshape(-1)
    am = flat.view(-1, 64).abs().argmax(dim=1) + torch.arange(4) * 64
    proposal = torch.zeros(flat.numel())
    proposal[am] = -torch.sign(flat[am])  # shrink the absmax elements: would rescale the block
    floored, feasible = floor_update(proposal, geo, 1.0)
    assert not bool(feasible[am].any()) and bool((floored == 0).all())
    counts = verify_code_changes({"w": w}, {"w": w + floored.reshape(w.shape)}, {"w": floored.reshape(w.shape) != 0})
    assert counts == {"changed": 0, "unchanged": 0, "collateral": 0}


def test_preview_floor_counts_and_budget():
    w = _weights(2, (16, 64))
    idx = index_from_masks({"w": torch.ones_like(w, dtype=torch.bool)})
    geo = floor_geometry({"w": w}, idx)
    prop = torch.randn(w.numel(), generator=torch.Generator().manual_seed(5)) * 1e-5
    fisher = torch.full((w.numel(),), 100.0)
    tensors = {"w.proposal": prop, "w.priority": prop.abs(), "w.bin_width": geo.bin_width, "w.move_up": geo.move_up,
               "w.move_down": geo.move_down, "w.cap_up": geo.cap_up, "w.cap_down": geo.cap_down, "w.fisher": fisher,
               "__epsilon__": torch.tensor([0.05])}
    small, big = preview_floor(tensors, 0.5), preview_floor(tensors, 2.0)
    assert small.n_updated > big.n_updated > 0                   # a bigger floor costs more budget per weight
    assert small.fisher_budget_used <= 1.0 and big.fisher_budget_used <= 1.0
    assert small.n_would_change_code == small.n_updated
    assert small.n_updated + small.n_dropped + small.n_unfloorable == small.n_candidates
    assert small.n_unfloored_would_change == 0                   # 1e-5 proposals alone change no code
    unbounded = preview_floor(tensors, 1.0, epsilon=math.inf)
    assert unbounded.n_dropped == 0 and unbounded.n_updated == w.numel() - unbounded.n_unfloorable
    with pytest.raises(ValueError, match="kappa"):
        preview_floor(tensors, 0.0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_streamed_masked_grad_equals_autograd(family):
    """masked_grad copies each gradient in from a backward hook (never all of them at once): it must equal
    torch.autograd.grad on the same coordinates, add alpha times it into `out`, and leave no .grad behind."""
    from mansu.testing import tiny_model
    from mansu.unlearn.params import quantizable_names
    from mansu.unlearn.retain_stats import masked_grad

    model = tiny_model(family)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    names = quantizable_names(model)
    masks = {n: torch.rand(params[n].shape, generator=gen) < (1.0 if i % 2 else 0.3) for i, n in enumerate(names)}
    index = index_from_masks(masks, model)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=gen)
    grads = torch.autograd.grad(model(ids, labels=ids).loss, [params[n] for n in index.names])
    expected = torch.cat([index.take(i, g) for i, g in enumerate(grads)])
    got = masked_grad(model, model(ids, labels=ids).loss, index)
    assert torch.equal(got, expected)
    out = torch.ones_like(got)
    masked_grad(model, model(ids, labels=ids).loss, index, out=out, alpha=0.5)
    torch.testing.assert_close(out, 1 + 0.5 * expected)
    assert all(p.grad is None for p in model.parameters())


def test_adam_in_place_step_equals_the_copying_step():
    from mansu.unlearn.methods.base import Adam

    gen = torch.Generator().manual_seed(0)
    a, b = Adam(1000, 1e-3), Adam(1000, 1e-3)
    for _ in range(3):
        g = torch.randn(1000, generator=gen)
        expected = a.step(g)
        assert torch.equal(b.step_(g.clone()), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_radix_top_indices_equal_topk(dtype, monkeypatch):
    """Beyond TOPK_DIRECT the selection is a chunked radix select: the same values as torch.topk (ties included),
    largest first, on scores with negatives, -inf and many ties, across chunk boundaries."""
    from mansu.unlearn.methods import base

    monkeypatch.setattr(base, "SELECT_CHUNK", 1000)
    gen = torch.Generator().manual_seed(0)
    score = torch.randn(10_007, generator=gen).mul_(3).round_().to(dtype)  # few distinct values: ties at the cut
    score[::7] = -math.inf
    for k in (1, 5, 999, 4000, 10_007):
        got = base.top_indices(score, k, direct_limit=100)
        want = torch.topk(score.float(), k).values
        assert got.unique().numel() == k
        assert torch.equal(score[got].float(), want)  # same multiset, largest first
