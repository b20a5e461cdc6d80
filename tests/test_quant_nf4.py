"""NF4 core: bit-exact against the installed bitsandbytes on CPU tensors (random, partial blocks, exact ties)."""

from __future__ import annotations

import pytest
import torch

from mansu.quant.nf4 import (
    FLOAT_DTYPES,
    NF4_LEVELS,
    codes_from_scaled,
    dequantize_nf4,
    nf4_levels,
    nf4_round_trip,
    nf4_thresholds,
    pack_nf4,
    quantize_nf4,
    unpack_nf4,
)

F = pytest.importorskip("bitsandbytes.functional")


def bnb_quant(x: torch.Tensor, blocksize: int):
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    return packed, state


def test_codebook_is_bitsandbytes_nf4():
    assert torch.equal(F.get_4bit_type("nf4", device="cpu"), nf4_levels())
    assert len(NF4_LEVELS) == 16 and nf4_thresholds().shape == (15,)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("shape", [(3, 70), (1001,), (7,), (64, 64), (5, 33), (2, 3, 40)])
def test_bit_exact_against_bitsandbytes(dtype, blocksize, shape):
    torch.manual_seed(blocksize + sum(shape))
    x = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = bnb_quant(x, blocksize)
    q = quantize_nf4(x, blocksize)
    assert torch.equal(q.packed(), packed)
    assert torch.equal(q.absmax, state.absmax)
    assert q.codes.dtype == torch.uint8 and q.absmax.dtype == torch.float32
    assert q.shape == tuple(shape) and q.dtype == dtype
    ours = dequantize_nf4(q)
    assert ours.dtype == dtype and ours.shape == x.shape
    # bnb's default-backend dequantize (flat blocks, same as its quantize and its CUDA kernel)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    ref = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, nf4_levels(), blocksize, shape, dtype)
    assert torch.equal(ours, ref.reshape(shape))
    # and its C++ CPU kernel, except where that kernel mis-indexes blocks (rows that are a multiple of 32 but not
    # of the blocksize; see docs/nf4.md)
    if not (len(shape) > 1 and shape[-1] % 32 == 0 and shape[-1] % blocksize):
        assert torch.equal(ours, F.dequantize_4bit(packed, state, quant_type="nf4").reshape(shape))


def test_exact_ties_go_to_the_lower_level_like_bitsandbytes():
    t = nf4_thresholds()
    up, down = torch.nextafter(t, torch.full_like(t, 2.0)), torch.nextafter(t, torch.full_like(t, -2.0))
    x = torch.cat([torch.tensor([1.0]), t, up, down, -t])  # absmax 1.0 -> s == x exactly
    x = torch.cat([x, torch.zeros(64 - x.numel() % 64)])
    packed, state = bnb_quant(x, 64)
    q = quantize_nf4(x, 64)
    assert torch.equal(q.packed(), packed)
    assert q.codes[1:16].tolist() == list(range(15))  # s == t_k -> code k (lower)
    assert q.codes[16:31].tolist() == list(range(1, 16))  # one ulp above -> upper
    # argmin over fp32 distances is NOT equivalent at ties: it picks the upper level at several midpoints
    argmin = (x[1:16, None] - nf4_levels()[None]).abs().argmin(1)
    assert (argmin != q.codes[1:16].long()).any()


def test_lookup_codes_equal_bucketize_near_every_threshold():
    t = nf4_thresholds()
    vals = [t]
    lo, hi = t.clone(), t.clone()
    for _ in range(300):  # 300 ulps either side of every threshold
        lo, hi = torch.nextafter(lo, torch.full_like(lo, -2.0)), torch.nextafter(hi, torch.full_like(hi, 2.0))
        vals += [lo, hi]
    s = torch.cat(vals + [torch.rand(200_000) * 2.2 - 1.1, torch.tensor([-1.0, 1.0, 0.0, -0.0, 1.0000001, -1.0000001])])
    assert torch.equal(codes_from_scaled(s), torch.bucketize(s, t, right=False, out_int32=True))


def test_partial_and_zero_blocks_follow_bitsandbytes_quirks():
    x = torch.zeros(64 + 10)  # an all-zero full block and an all-zero partial block
    packed, state = bnb_quant(x, 64)
    q = quantize_nf4(x, 64)
    assert torch.equal(q.packed(), packed) and torch.equal(q.absmax, state.absmax)
    assert q.absmax.tolist() == [0.0, pytest.approx(1e-38)]
    assert set(q.codes.tolist()) == {7}
    assert torch.equal(dequantize_nf4(q), torch.zeros(74))


def test_large_tensor_across_chunks_matches_bitsandbytes():
    torch.manual_seed(1)
    x = torch.randn(4096 * 64 * 2 + 1000 + 30)  # crosses chunk boundaries, ends in a partial block
    packed, state = bnb_quant(x, 64)
    q = quantize_nf4(x, 64)
    assert torch.equal(q.packed(), packed) and torch.equal(q.absmax, state.absmax)


def test_pack_unpack_round_trip_and_odd_padding():
    codes = torch.randint(0, 16, (11,), dtype=torch.uint8)
    p = pack_nf4(codes)
    assert p.shape == (6, 1) and int(p[-1, 0]) & 0xF == 7
    assert int(p[0, 0]) == (int(codes[0]) << 4) | int(codes[1])
    assert torch.equal(unpack_nf4(p, 11), codes)


def test_round_trip_is_idempotent_and_close():
    torch.manual_seed(2)
    w = torch.randn(32, 128) * 0.02
    r = nf4_round_trip(w)
    assert r.shape == w.shape and r.dtype == w.dtype
    assert torch.equal(nf4_round_trip(r), r)  # grid-aligned weights stay put
    assert (r - w).abs().max() < 0.2 * w.abs().max()
    assert not torch.equal(r, w)


@pytest.mark.parametrize(
    ("x", "blocksize", "match"),
    [
        (torch.ones(8, dtype=torch.int64), 64, "dtype"),
        (torch.ones(8, dtype=torch.float64), 64, "dtype"),
        (torch.empty(0), 64, "empty"),
        (torch.ones(8), 0, "blocksize"),
        (torch.ones(8), 63, "blocksize"),
        (torch.ones(8), -64, "blocksize"),
        (torch.tensor([1.0, float("nan")]), 64, "NaN"),
        (torch.tensor([1.0, float("inf")]), 64, "Inf"),
    ],
)
def test_bad_input_raises_value_error_naming_the_tensor(x, blocksize, match):
    with pytest.raises(ValueError, match=match) as info:
        quantize_nf4(x, blocksize, name="layers.0.q_proj.weight")
    assert "layers.0.q_proj.weight" in str(info.value)
