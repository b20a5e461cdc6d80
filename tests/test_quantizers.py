"""Every registered quantizer against its library, on adversarial tensors: codes, scales and zero points
bit-exact (ties included), dequantized weights identical, and the exact smallest level-changing move checked by
applying it and requantizing with the library."""

from __future__ import annotations

import pytest
import torch

from mansu.quant.base import Quantizer
from mansu.quant.nf4 import NF4_LEVELS, nf4_thresholds, unpack_nf4
from mansu.quant.quantizers.fp4 import FP4_CODE, ORDER, ZERO_SPLIT, fp4_thresholds
from mansu.quant.registry import QUANTIZERS, get_quantizer

F = pytest.importorskip("bitsandbytes.functional")
bnb = pytest.importorskip("bitsandbytes")
ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NAMES = tuple(QUANTIZERS)
INT4_ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128)


# ---- the libraries, in the Quantized conventions (codes shaped like w; int4 codes and zeros unsigned) --------
def lib_quantize(name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes int64 like w, scales, zeros int64 or None) from the library itself."""
    if name in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=name)
        return unpack_nf4(packed, w.numel()).long().reshape(w.shape), state.absmax, None
    if name == "int8":  # what load_in_8bit does to a Linear weight on its way to the device
        p = bnb.nn.Int8Params(w.detach().clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        return p.CB.long(), p.SCB, None
    scale, zero = compute_dynamic_scales_and_zp(w, INT4_ARGS, module=None)
    q = ct_forward.quantize(w, scale, zero, INT4_ARGS, dtype=torch.int8)
    return q.long() + 8, scale, zero.long() + 8


def lib_round_trip(name: str, w: torch.Tensor) -> torch.Tensor:
    if name in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=name)
        return F.dequantize_4bit(packed, state)
    if name == "int8":
        p = bnb.nn.Int8Params(w.detach().clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        return F.int8_vectorwise_dequant(p.CB, p.SCB).to(w.dtype)
    scale, zero = compute_dynamic_scales_and_zp(w, INT4_ARGS, module=None)
    q = ct_forward.quantize(w, scale, zero, INT4_ARGS, dtype=torch.int8)
    return ct_forward.dequantize(q, scale, zero, INT4_ARGS, dtype=w.dtype)


def to_levels(name: str, codes: torch.Tensor) -> torch.Tensor:
    """Library codes -> levels (distinct dequantized values): identity except fp4's two zero codes."""
    if name != "fp4":
        return codes
    table = torch.empty(16, dtype=torch.long)
    pos = torch.arange(16)
    table[torch.tensor(ORDER)] = pos - (pos > ZERO_SPLIT).long()
    return table[codes]


# ---- adversarial tensors --------------------------------------------------------------------------------------
def adversarial(dtype: torch.dtype, name: str, seed: int = 0) -> torch.Tensor:
    """[16, 256] rows of hard cases (each row = 4 nf4/fp4 blocks = 2 int4 groups = 1 int8 row), cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    r = [torch.randn(256, generator=g) * 0.02 for _ in range(16)]
    r[1] = torch.zeros(256)
    r[2] = torch.full((256,), 0.5)  # all-equal groups
    r[3] = torch.full((256,), -0.3)
    r[4] = -r[4].abs()  # negative-only
    r[5] = r[5].abs() * 50  # positive-only
    r[6] = (r[6] * 5e5).clamp(-6.5e4, 6.5e4)  # huge, inside float16
    if dtype != torch.float16 and name != "int8":
        r[7] = r[7] * 5e31
    tiny = {torch.float32: 1e-39, torch.float16: 1e-3, torch.bfloat16: 1e-30}[dtype]  # fp32: subnormal absmax
    r[8] = r[8] * tiny
    dup = r[9]  # absmax duplicates, both signs, in every block and group
    for i in range(0, 256, 32):
        dup[i], dup[i + 5], dup[i + 9] = 0.1, -0.1, 0.1
    r[10] = _ties_4bit(torch.tensor(NF4_LEVELS), nf4_thresholds())  # ties at NF4 midpoints (absmax 1)
    fp4_sorted = torch.tensor(FP4_CODE)[torch.tensor(ORDER)]
    r[11] = _ties_4bit(fp4_sorted, fp4_thresholds())  # ties at FP4 midpoints and around its split zero
    r[12] = torch.cat([torch.tensor([127.0, -127.0]), torch.arange(-126.5, 127.0, 1.0)])  # int8 ties (scale 1)
    r[13] = torch.cat([_int4_group(-8.0, 7.0), _int4_group(-2.5, 12.5)])  # int4 ties (scale 1), zero-point tie
    r[14] = torch.cat([torch.linspace(3.0, 18.0, 128), -torch.linspace(0.5, 4.0, 128)])  # zero outside range
    r[15][::7] = 0.0
    return torch.stack(r).to(dtype)


def _ties_4bit(levels: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    t = thresholds.float()
    block = torch.cat([torch.tensor([1.0]), t, -t, levels, torch.tensor([0.0, -0.0, 1e-7, -1e-7])])
    block = torch.cat([block, torch.zeros(64 - block.numel() % 64)])[:64]
    return block.repeat(4)


def _int4_group(lo: float, hi: float) -> torch.Tensor:
    halves = torch.arange(lo + 0.5, hi, 1.0)  # x / s + z lands exactly on k + 0.5
    body = torch.cat([torch.tensor([lo, hi]), halves, torch.arange(lo, hi + 1, 1.0)])
    return torch.cat([body, torch.full((128 - body.numel(),), (lo + hi) / 2)])


def random_weight(dtype: torch.dtype, shape=(24, 256), seed: int = 1) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


# ---- bit-exactness --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_quantize_and_dequantize_are_bit_exact_with_the_library(name, dtype):
    qz = get_quantizer(name)
    for w in (adversarial(dtype, name), random_weight(dtype, (40, 384))):
        q = qz.quantize(w)
        codes, scales, zeros = lib_quantize(name, w)
        assert q.codes.shape == w.shape
        assert torch.equal(q.codes.long(), codes)
        assert q.scales.dtype == scales.dtype and torch.equal(q.scales.reshape(scales.shape), scales)
        if zeros is None:
            assert q.zeros is None
        else:
            assert torch.equal(q.zeros.long().reshape(zeros.shape), zeros)
        deq, ref = qz.dequantize(q), lib_round_trip(name, w)
        assert deq.dtype == w.dtype and torch.equal(deq, ref.reshape(w.shape))
        assert torch.equal(qz.round_trip(w), deq)
        if name == "int4-g128":  # the fused path llmcompressor calibrates with gives the same weights
            assert torch.equal(ct_forward.fake_quantize(w, scales, zeros - 8, INT4_ARGS), deq)


def test_the_adversarial_tensors_exercise_ties():
    """The tie rows really put scaled values on decision boundaries (else the bit-exact test proves less)."""
    w = adversarial(torch.float32, "nf4")
    assert bool(torch.isin(w[10], nf4_thresholds()).sum() >= 30)
    codes = lib_quantize("int8", w)[0][12]  # round half to even on x.5
    assert codes[2:6].tolist() == [-126, -126, -124, -124]
    _, _, zeros = lib_quantize("int4-g128", w)
    assert zeros[13].tolist() == [8, 2]  # zero point -5.5 rounds to -6 (half to even)


@pytest.mark.parametrize("name", ["nf4", "fp4", "int8"])
def test_partial_blocks_and_odd_sizes_are_bit_exact(name):
    qz = get_quantizer(name)
    w = random_weight(torch.float32, (5, 67), seed=3)
    w[4] = 0.0  # the last, partial nf4/fp4 block is all zero
    q = qz.quantize(w)
    codes, scales, _ = lib_quantize(name, w)
    assert torch.equal(q.codes.long(), codes) and torch.equal(q.scales, scales)
    assert torch.equal(qz.dequantize(q), lib_round_trip(name, w).reshape(w.shape))


def test_large_tensor_spans_many_chunks_and_stays_exact():
    w = random_weight(torch.float32, (300, 1024), seed=4)
    for name in NAMES:
        q = get_quantizer(name).quantize(w)
        codes, scales, _ = lib_quantize(name, w)
        assert torch.equal(q.codes.long(), codes) and torch.equal(q.scales.reshape(scales.shape), scales), name


# ---- the exact smallest move ---------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_min_move_changes_the_level_and_one_step_less_does_not(name, dtype, direction):
    qz = get_quantizer(name)
    w = torch.cat([adversarial(dtype, name, seed=5), random_weight(dtype, (8, 256), seed=6)])
    codes0, scales0, zeros0 = lib_quantize(name, w)
    level0 = to_levels(name, codes0)
    move = qz.min_move(w, direction)
    target, feasible = qz.move_target(w, direction)
    frozen = qz.frozen_mask(w)
    assert torch.equal(torch.isfinite(move), feasible)
    assert not bool((feasible & frozen).any())
    assert feasible.float().mean() > 0.5

    def requantized(x: torch.Tensor) -> torch.Tensor:
        codes, scales, zeros = lib_quantize(name, x)
        assert torch.equal(scales, scales0), "a scale-preserving move changed the scales"
        assert zeros is None or torch.equal(zeros, zeros0)
        return to_levels(name, codes)

    # every feasible element moved at once to its target: each one's level changes, in the direction
    moved_level = requantized(torch.where(feasible, target, w))
    assert torch.equal(moved_level[~feasible], level0[~feasible])
    assert bool(((moved_level - level0) * direction > 0)[feasible].all())
    # the representable weight one step before the target keeps every level
    before = torch.nextafter(target, torch.full_like(target, -direction * float("inf")))
    assert torch.equal(requantized(torch.where(feasible, before, w)), level0)
    # applying the move in fp32 arithmetic reaches the target
    applied = torch.where(feasible, (w.float() + direction * move).to(dtype), w)
    assert bool(((requantized(applied) - level0) * direction > 0)[feasible].all())


@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_generic_bisection_agrees_with_the_nf4_boundary_search(dtype, direction):
    """Two independent searches for the same boundary: the NF4-specific stepping search (mansu.quant.geometry)
    and the generic bisection over the dtype's grid (mansu.quant.base, which the nf4 Quantizer uses)."""
    from mansu.quant.geometry import code_change_target

    w = torch.cat([adversarial(dtype, "nf4", seed=7), random_weight(dtype, (8, 256), seed=8)])
    if dtype == torch.float32:
        w = w[torch.arange(w.shape[0]) != 8]  # the subnormal row: the stepping search does not converge there
    t_nf4, f_nf4 = code_change_target(w, direction, 64)
    t_gen, f_gen = Quantizer.move_target(get_quantizer("nf4"), w, direction)
    assert torch.equal(f_nf4, f_gen)
    assert torch.equal(t_nf4, t_gen)


@pytest.mark.parametrize("name", NAMES)
def test_min_move_lands_on_the_cell_boundary(name):
    """In fp32 the target sits on the real-number cell boundary, up to the library's rounding (int8: half a
    float16 step, as it decides on fp16(w))."""
    qz = get_quantizer(name)
    w = random_weight(torch.float32, (16, 256), seed=9)
    lower, upper = qz.cell_bounds(w)
    width = qz.bin_width(w)
    tol = 0.07 if name == "int8" else 1e-4
    for direction, bound in ((1, upper), (-1, lower)):
        target, feasible = qz.move_target(w, direction)
        assert bool(((target - bound).abs() <= tol * width)[feasible].all())


# ---- cells, caps, frozen elements -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_cells_contain_the_weight_and_its_dequantized_value(name):
    qz = get_quantizer(name)
    w = random_weight(torch.float32, (16, 256), seed=10)
    lower, upper = qz.cell_bounds(w)
    deq = qz.round_trip(w)
    slack = 1e-6 * qz.bin_width(w).max()
    if name == "int4-g128":  # the rounded zero point can put an edge level up to s/2 outside [lo_g, hi_g]
        slack = 0.5 * qz.quantize(w).scales.float().repeat_interleave(128, dim=1) * (1 + 1e-6)
    if name != "int8":  # int8 decides on fp16(w): the fp32 weight may sit half a float16 step outside
        assert bool(((lower <= w) & (w <= upper)).all())
    assert bool(((lower - slack <= deq) & (deq <= upper + slack)).all())
    assert torch.equal(qz.bin_width(w), upper - lower) or name == "nf4"
    cap_lo, cap_hi = qz.scale_caps(w)
    assert bool(((cap_lo <= lower) & (upper <= cap_hi)).all())


def test_bin_widths_follow_each_grid():
    w = random_weight(torch.float32, (4, 256), seed=11)
    a = w.to(torch.float16).float().abs().amax(dim=1, keepdim=True)
    codes = get_quantizer("int8").quantize(w).codes
    inner = codes.abs() < 127
    assert torch.allclose(get_quantizer("int8").bin_width(w)[inner], (a / 127).expand_as(w)[inner], rtol=1e-6)
    q4 = get_quantizer("int4-g128").quantize(w)
    s = q4.scales.repeat_interleave(128, dim=1)
    inner = (q4.codes > 0) & (q4.codes < 15)
    assert torch.allclose(get_quantizer("int4-g128").bin_width(w)[inner], s[inner], rtol=1e-6)
    fp4 = get_quantizer("fp4")
    zero_cell = torch.isin(fp4.quantize(w).codes, torch.tensor([0, 8]))  # fp4's +0 and "-0" codes: one level
    a64 = w.abs().reshape(-1, 64).amax(dim=1).repeat_interleave(64).reshape(w.shape)
    assert int(zero_cell.sum()) > 0
    assert torch.allclose(fp4.bin_width(w)[zero_cell], (a64 / 192)[zero_cell], rtol=1e-5)  # +-1/384 of absmax
    assert fp4.bin_width(w)[zero_cell].max() < 0.1 * get_quantizer("nf4").bin_width(w).min()


@pytest.mark.parametrize("name", NAMES)
def test_frozen_elements_set_the_scales(name):
    """Nudging a frozen element inward changes its group's scales in the library; the others cannot."""
    qz = get_quantizer(name)
    w = random_weight(torch.float32, (4, 256), seed=12)
    frozen = qz.frozen_mask(w)
    groups = {"nf4": 4, "fp4": 4, "int8": 1, "int4-g128": 2}[name]
    assert int(frozen.sum()) >= 4 * groups and int(frozen.sum()) <= 8 * groups
    _, scales0, _ = lib_quantize(name, w)
    nudged = torch.where(frozen, w * 0.9, w)
    _, scales1, _ = lib_quantize(name, nudged)
    assert bool((scales1 != scales0).all())
    assert torch.isinf(qz.min_move(w, 1)[frozen]).all() and torch.isinf(qz.min_move(w, -1)[frozen]).all()


def test_asymmetric_caps_include_zero_and_free_the_min_of_a_positive_group():
    qz = get_quantizer("int4-g128")
    w = torch.linspace(0.5, 2.0, 128).reshape(1, 128)  # all positive: the scale comes from 0 and the max
    cap_lo, cap_hi = qz.scale_caps(w)
    assert bool((cap_lo == 0).all()) and bool((cap_hi == 2.0).all())
    frozen = qz.frozen_mask(w)
    assert frozen.sum() == 1 and bool(frozen[0, -1])
    assert torch.isfinite(qz.min_move(w, -1)[0, 0])  # the minimum may move down (to 0) without a new scale


def test_all_zero_and_all_equal_groups_are_frozen_or_capped():
    for name in NAMES:
        qz = get_quantizer(name)
        w = torch.zeros(2, 256)
        w[1] = 0.25
        assert torch.isinf(qz.min_move(w, 1)).all() and torch.isinf(qz.min_move(w, -1)[0]).all(), name


# ---- registry and validation ----------------------------------------------------------------------------------
def test_registry_is_the_one_list():
    assert NAMES == ("nf4", "fp4", "int8", "int4-g128")
    for name, qz in QUANTIZERS.items():
        assert qz.name == name and qz.library and qz.description
    with pytest.raises(ValueError, match="nf4, fp4, int8, int4-g128"):
        get_quantizer("int3")


def test_bad_inputs_raise_value_errors_that_say_what_is_accepted():
    with pytest.raises(ValueError, match="multiple of 128"):
        get_quantizer("int4-g128").quantize(torch.zeros(4, 100), name="m0.up")
    with pytest.raises(ValueError, match="65504"):
        get_quantizer("int8").quantize(torch.full((2, 4), 1e5))
    for name in NAMES:
        with pytest.raises(ValueError, match="NaN"):
            get_quantizer(name).quantize(torch.full((2, 128), float("nan")))
        with pytest.raises(ValueError, match="dtype"):
            get_quantizer(name).quantize(torch.zeros(2, 128, dtype=torch.int32))
        with pytest.raises(ValueError, match="direction"):
            get_quantizer(name).min_move(torch.zeros(2, 128), 0)
