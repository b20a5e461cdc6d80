"""The Gram-matrix retain projector equals the dense QR projection where mansu/unlearn/projection.py says it does:
fp32 rows to float tolerance (over several column blocks, rank-deficient or not, and on the demo model's real
per-example retain gradients); bf16 rows exactly the QR projection of the bf16-rounded gradients."""

from __future__ import annotations

import pytest
import torch

from mansu.unlearn import projection
from mansu.unlearn.data import encode_records
from mansu.unlearn.params import full_masks, index_from_masks
from mansu.unlearn.projection import RetainProjector, orthonormal_basis, project_off
from mansu.unlearn.retain_stats import per_example_grads, retain_statistics


def _qr_projection64(rows: torch.Tensor, g: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """The dense QR projection in fp64 (the reference both float32 paths approximate)."""
    q, r = torch.linalg.qr(rows.double().T, mode="reduced")
    diag = r.diagonal().abs()
    q = q[:, diag > tol * diag.max()]
    g64 = g.double()
    return g64 - q @ (q.T @ g64)


def _rel(a: torch.Tensor, b: torch.Tensor, removed: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / removed.double().norm())


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(projection, "CHUNK", 1000)  # several column blocks, so the block loops are exercised


def test_fp32_rows_equal_the_dense_qr_projection(small_chunks):
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(16, 4500, generator=gen) * torch.rand(16, 1, generator=gen)  # last block partial
    g = torch.randn(4500, generator=gen) + 3 * rows[2]
    proj = RetainProjector.from_rows(rows, dtype=torch.float32)
    assert len(proj.blocks) == 5 and proj.rank == 16
    assert proj.nbytes == 16 * 4500 * 4 + 16 * 16 * 8             # rows + whitening, before the work buffer
    exact = _qr_projection64(rows, g)
    p = proj.project(g)
    assert _rel(p, exact, g.double() - exact) < 1e-5
    dense = project_off(g, orthonormal_basis(rows))
    assert _rel(p, dense, g - dense) < 1e-4                     # today's dense projection, same answer
    assert float((rows.double() @ p.double()).abs().max()) < 1e-4 * float(g.norm() * rows.norm(dim=1).max())
    assert _rel(proj.project(p), p, g - p) < 1e-5               # idempotent
    assert proj.nbytes == 16 * 4500 * 4 + 16 * 16 * 8 + 16 * 1000 * 8  # + one fp64 block buffer


def test_rank_deficient_rows_drop_the_dependent_direction(small_chunks):
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(6, 2500, generator=gen)
    rows[5] = rows[0] + 2 * rows[1]
    g = torch.randn(2500, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        proj = RetainProjector.from_rows(rows, dtype=dtype)
        assert proj.rank == 5, dtype
    proj = RetainProjector.from_rows(rows, dtype=torch.float32)
    exact = _qr_projection64(rows[:5], g)
    assert _rel(proj.project(g), exact, g.double() - exact) < 1e-5


def test_bf16_rows_are_the_exact_projection_of_the_rounded_gradients(small_chunks):
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(16, 3000, generator=gen)
    g = torch.randn(3000, generator=gen) + rows[0] - rows[7]
    proj = RetainProjector.from_rows(rows)                      # bf16 by default
    assert proj.nbytes == 16 * 3000 * 2 + 16 * 16 * 8           # half of fp32 Q, and no QR copies
    rounded = rows.bfloat16().float()
    exact = _qr_projection64(rounded, g, tol=2 ** -7)
    p = proj.project(g)
    assert _rel(p, exact, g.double() - exact) < 1e-5
    assert float((rounded.double() @ p.double()).abs().max()) < 1e-4 * float(g.norm() * rounded.norm(dim=1).max())
    vs_fp32 = _qr_projection64(rows, g)                          # the rounding, nothing more
    assert 0 < _rel(p, vs_fp32, g.double() - vs_fp32) < 2e-2


def test_unfinished_or_overfull_projector_says_so():
    proj = RetainProjector(10, 1, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="finish"):
        proj.project(torch.ones(10))
    proj.add(torch.ones(10))
    with pytest.raises(ValueError, match="holds 1"):
        proj.add(torch.ones(10))


def test_demo_retain_projection_equals_the_dense_qr_one(demo_lm, demo_records):
    """Real per-example retain gradients of the demo model (all quantizable weights): the projector the engine
    builds (fp32 rows) equals the QR projection of the same gradients; bf16 rows stay within the rounding."""
    model, tok = demo_lm.model, demo_lm.tokenizer
    retain = encode_records(tok, demo_records["retain"][:8])
    forget = encode_records(tok, demo_records["forget"][:1])
    index = index_from_masks(full_masks(model), model)
    rows = torch.stack([g for _, g in per_example_grads(model, retain, index, 4, seed=0)])
    _, g = next(per_example_grads(model, forget, index, 1, seed=0))
    exact = _qr_projection64(rows, g)
    fp32 = retain_statistics(model, retain, index, k=4, n_fisher=1, seed=0, dtype=torch.float32).projector
    bf16 = retain_statistics(model, retain, index, k=4, n_fisher=1, seed=0, dtype=torch.bfloat16).projector
    assert fp32.rank == 4
    assert _rel(fp32.project(g), exact, g.double() - exact) < 1e-4
    assert _rel(bf16.project(g), exact, g.double() - exact) < 2e-2


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma", "mistral"])
def test_factored_projection_equals_dense_qr_under_a_partial_circuit(family):
    """Every family (GPT-2's Conv1D weights are [in, out]), a circuit that keeps whole weights and random parts
    of others: the factored projector (fp32 factors) equals the dense QR projection of the per-example
    gradients restricted to the circuit; the retain gradients are orthogonal to the result."""
    from mansu.testing import tiny_model, toy_records, toy_tokenizer
    from mansu.unlearn.params import quantizable_names

    torch.manual_seed(0)
    model = tiny_model(family).eval()
    tok = toy_tokenizer()
    records = toy_records(10)
    retain, forget = encode_records(tok, records[:8]), encode_records(tok, records[8:])
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    masks = {n: (torch.ones_like(params[n], dtype=torch.bool) if i % 2 else torch.rand(params[n].shape, generator=gen)
                 < 0.3) for i, n in enumerate(quantizable_names(model))}
    index = index_from_masks(masks, model)
    assert any(i is None for i in index.flat_idx) and any(i is not None for i in index.flat_idx)
    rows = torch.stack([g for _, g in per_example_grads(model, retain, index, 5, seed=0)])
    _, g = next(per_example_grads(model, forget, index, 1, seed=0))
    exact = _qr_projection64(rows, g)
    proj = retain_statistics(model, retain, index, k=5, n_fisher=5, seed=0, dtype=torch.float32).projector
    assert proj.rank == 5
    p = proj.project(g)
    assert _rel(p, exact, g.double() - exact) < 1e-5
    assert float((rows.double() @ p.double()).abs().max()) < 1e-5 * float(g.norm() * rows.norm(dim=1).max())
