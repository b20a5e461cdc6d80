"""The quantizer-general floor (issue 11, item 4): floored on one or several grids at once (`floor_quantizers`),
every floored weight changes its level under each listed grid's real library (bitsandbytes nf4 / fp4 / int8,
compressed-tensors int4-g128) and no other weight's code or any scale changes -- on tiny random Llama and GPT-2
(Conv1D, quantized transposed) models, with the floor functions on real weights and through a MANSU run."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from mansu.data.records import MCQRecord
from mansu.quant.registry import QUANTIZERS
from mansu.quant.targets import quant_layout, quantizable_parameter_names
from mansu.testing import tiny_model, write_tiny_world
from mansu.unlearn.config import UnlearnConfig
from mansu.unlearn.data import encode_records
from mansu.unlearn.engine import run_unlearning
from mansu.unlearn.floor import floor_geometry, floor_update, verify_code_changes
from mansu.unlearn.params import apply_update, index_from_masks

F = pytest.importorskip("bitsandbytes.functional")
bnb = pytest.importorskip("bitsandbytes")
ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp  # noqa: E402

INT4_ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128)
FAMILIES = ("llama", "gpt2")
FLOORS = (*QUANTIZERS, "nf4,int4-g128", ",".join(QUANTIZERS))
FRACTION = 0.05  # of the quantizable coordinates proposed for a floored move
KAPPA = 1.0      # the default: one whole cell of every listed grid


def library(grid: str, view: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """(codes, scales (and zero points), dequantized weight) of the view [out, in] from the grid's own library."""
    if grid in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(view, blocksize=64, quant_type=grid)
        return packed, (state.absmax,), F.dequantize_4bit(packed, state)
    if grid == "int8":  # what load_in_8bit stores for a Linear weight
        p = bnb.nn.Int8Params(view.detach().clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        return p.CB, (p.SCB,), F.int8_vectorwise_dequant(p.CB, p.SCB).to(view.dtype)
    scale, zero = compute_dynamic_scales_and_zp(view, INT4_ARGS, module=None)
    q = ct_forward.quantize(view, scale, zero, INT4_ARGS, dtype=torch.int8)
    return q, (scale, zero), ct_forward.dequantize(q, scale, zero, INT4_ARGS, dtype=view.dtype)


def assert_levels_change_exactly_where_floored(model, updated, touched: dict[str, torch.Tensor], grids: list[str]):
    """Under each grid's library: every floored weight's level (its dequantized value; for nf4, int8 and int4 also
    its code) changed, nothing else changed, and every scale is the same."""
    layout = quant_layout(model)
    base, new = dict(model.named_parameters()), dict(updated.named_parameters())
    for grid in grids:
        n_checked = 0
        for name, mask in touched.items():
            v0, v1 = (layout.view(name, p[name].detach()) for p in (base, new))
            m = layout.view(name, mask)
            assert torch.equal(v0[~m], v1[~m]) and bool((v0[m] != v1[m]).all()), name  # the update is the floored set
            c0, s0, d0 = library(grid, v0)
            c1, s1, d1 = library(grid, v1)
            assert all(torch.equal(a, b) for a, b in zip(s0, s1)), (grid, name)  # no scale or zero point moved
            assert bool((d0 != d1)[m].all()), (grid, name, int((d0 == d1)[m].sum()))  # 100% of floored levels
            assert torch.equal(d0[~m], d1[~m]), (grid, name)  # 0 levels outside the update
            if grid in ("int8", "int4-g128"):
                assert bool((c0 != c1)[m].all()) and torch.equal(c0[~m], c1[~m]), (grid, name)
            elif grid == "nf4":  # packed two codes a byte: compare unpacked
                from mansu.quant.nf4 import unpack_nf4

                u0, u1 = (unpack_nf4(c, v0.numel()).reshape(v0.shape) for c in (c0, c1))
                assert bool((u0 != u1)[m].all()) and torch.equal(u0[~m], u1[~m]), (grid, name)
            n_checked += int(m.sum())
        assert n_checked > 0, grid


def floored_update(model, floor: str, seed: int = 0):
    """(updated deep copy, {name: floored mask}, feasible mask, index) for sub-bin proposals on a random 5% of the
    quantizable coordinates, floored on the grids `floor`."""
    names = quantizable_parameter_names(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    gen = torch.Generator().manual_seed(seed)
    index = index_from_masks({n: torch.rand(p.shape, generator=gen) < FRACTION for n, p in params.items()})
    geo = floor_geometry(params, index, layout=quant_layout(model), quantizers=floor)
    proposal = torch.randn(index.numel, generator=gen).sign() * 1e-7  # far below any bin: the floor does the work
    delta, feasible = floor_update(proposal, geo, KAPPA)
    updated = copy.deepcopy(model)
    apply_update(updated, index, delta)
    return updated, {n: t != 0 for n, t in index.scatter(delta).items()}, feasible, index


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    """A tiny random model whose every quantizable weight int4-g128 can group (hidden 128)."""
    return tiny_model(request.param, hidden=128, layers=1)


@pytest.mark.parametrize("floor", FLOORS)
def test_floored_levels_change_under_every_listed_library(model, floor):
    updated, touched, feasible, _ = floored_update(model, floor)
    n = sum(int(m.sum()) for m in touched.values())
    assert n == int(feasible.sum()) and n > 0.5 * feasible.numel()  # most proposals are floorable
    grids = floor.split(",")
    assert_levels_change_exactly_where_floored(model, updated, touched, grids)
    base, new = dict(model.named_parameters()), dict(updated.named_parameters())
    for grid in grids:  # mansu's pure-torch check agrees with the libraries
        counts = verify_code_changes(base, new, touched, layout=quant_layout(model), quantizer=grid)
        assert counts == {"changed": n, "unchanged": 0, "collateral": 0}, grid


def test_several_grids_combine_each_grid_bit_exactly(model):
    """The combined geometry is the elementwise max of the moves and bin widths and the min of the caps, so a
    coordinate floorable on nf4+int4-g128 is floorable on each alone, with a move at least each one's."""
    names = quantizable_parameter_names(model)
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    index = index_from_masks({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.1
                              for n, p in params.items()})
    layout = quant_layout(model)
    nf4, int4 = (floor_geometry(params, index, layout=layout, quantizers=q) for q in ("nf4", "int4-g128"))
    both = floor_geometry(params, index, layout=layout, quantizers=("nf4", "int4-g128"))
    assert torch.equal(both.x0, nf4.x0)
    for f in ("bin_width", "move_up", "move_down"):
        assert torch.equal(getattr(both, f), torch.maximum(getattr(nf4, f), getattr(int4, f))), f
    for f in ("cap_up", "cap_down"):
        assert torch.equal(getattr(both, f), torch.minimum(getattr(nf4, f), getattr(int4, f))), f
    assert torch.equal(floor_geometry(params, index, layout=layout).move_up, nf4.move_up)  # nf4 is the default
    prop = torch.randn(index.numel, generator=torch.Generator().manual_seed(2)).sign() * 1e-7
    moves = {name: floor_update(prop, g, KAPPA) for name, g in (("nf4", nf4), ("int4", int4), ("both", both))}
    ok = moves["both"][1]
    assert not bool((ok & ~moves["nf4"][1]).any()) and not bool((ok & ~moves["int4"][1]).any())
    assert bool((ok < (moves["nf4"][1] & moves["int4"][1])).any())  # the joint constraint does bind somewhere
    for single in ("nf4", "int4"):
        assert bool((moves["both"][0].abs()[ok] >= moves[single][0].abs()[ok]).all()), single


def test_a_grid_that_cannot_group_a_tensor_places_no_constraint_on_it():
    """int4-g128 cannot group rows of 32: those weights stay in full precision, so nf4+int4-g128 floors them as
    nf4 alone does, and int4-g128 alone leaves them unfloorable."""
    model = tiny_model("llama")  # hidden 32
    names = quantizable_parameter_names(model)
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    index = index_from_masks({n: torch.ones(p.shape, dtype=torch.bool) for n, p in params.items()})
    nf4 = floor_geometry(params, index, quantizers="nf4")
    both = floor_geometry(params, index, quantizers="nf4,int4-g128")
    for f in ("bin_width", "move_up", "move_down", "cap_up", "cap_down"):
        assert torch.equal(getattr(both, f), getattr(nf4, f)), f
    only = floor_geometry(params, index, quantizers="int4-g128")
    assert not bool(floor_update(torch.ones(index.numel), only, KAPPA)[1].any())


WORDS = ["Zorb", "Quil", "Marn", "Tesk", "Vory", "Plim", "red", "blue", "green", "amber", "Where", "is", "from", "?"]


def test_mansu_run_floored_on_nf4_and_int4_changes_every_touched_level_under_both_libraries():
    from mansu.models.demo import build_tokenizer

    tok = build_tokenizer([" ".join(WORDS) + " Answer :"])
    model = tiny_model("llama", vocab_size=len(tok), hidden=128)
    names, colors = WORDS[:6], WORDS[6:10]
    records = [MCQRecord(f"Where is {names[i % 6]} from ?", tuple(colors), i % 4) for i in range(12)]
    forget, retain = encode_records(tok, records[:6]), encode_records(tok, records[6:])
    cfg = UnlearnConfig(method="mansu", steps=2, batch_size=4, k=2, n_fisher=4, update_fraction=0.01, epsilon=1e6,
                        floor_quantizers="nf4,int4-g128")
    assert cfg.to_dict()["floor_quantizers"] == "nf4,int4-g128"  # recorded in config.json as every field is
    updated = copy.deepcopy(model)
    res = run_unlearning(updated, forget, retain, cfg)
    assert res.summary["n_params_touched"] > 0
    base, new = dict(model.named_parameters()), dict(updated.named_parameters())
    touched = {n: new[n] != base[n] for n in res.index.names}
    assert sum(int(m.sum()) for m in touched.values()) == res.summary["n_params_touched"]
    assert_levels_change_exactly_where_floored(model, updated, touched, ["nf4", "int4-g128"])


def test_floor_quantizers_are_validated_and_canonical():
    assert UnlearnConfig().floor_quantizers == "nf4"
    assert UnlearnConfig(floor_quantizers=(" int4-g128", "nf4", "nf4")).floor_quantizers == "int4-g128,nf4"
    with pytest.raises(ValueError, match=f"^floor_quantizers: unknown quantizer 'nf5' in 'nf4,nf5'; choose among "
                                         f"{', '.join(QUANTIZERS)}$"):
        UnlearnConfig(floor_quantizers="nf4,nf5")
    with pytest.raises(ValueError, match="names none"):
        UnlearnConfig(floor_quantizers=" , ")


def test_run_refuses_an_unknown_floor_quantizer_before_creating_a_folder(tmp_path):
    world = write_tiny_world(tmp_path / "world")
    runs = tmp_path / "runs"
    env = {**os.environ, "MANSU_HOME": str(tmp_path / "home"), "MANSU_RUNS": str(runs)}
    out = subprocess.run([sys.executable, "-m", "mansu", "run", "--model", world["model"], "--forget",
                          world["forget"], "--retain", world["retain"], "--floor-quantizers", "nf5"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: floor_quantizers: unknown quantizer 'nf5' in 'nf5'; choose among "
                      f"{', '.join(QUANTIZERS)}"], out.stderr[-2000:]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert not runs.exists() or list(Path(runs).iterdir()) == []  # no run folder, no hidden temp folder


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_candidate_geometry_equals_the_whole_weight_geometry(family):
    """The per-step geometry (only the groups holding a candidate) equals the whole-weight geometry at the same
    coordinates, for every grid and combination, in the parameter's layout (GPT-2's Conv1D transposed)."""
    from mansu.quant.targets import quant_layout
    from mansu.testing import tiny_model
    from mansu.unlearn.floor import floor_geometry
    from mansu.unlearn.params import full_masks, index_from_masks, sub_index

    torch.manual_seed(0)
    model = tiny_model(family, hidden=128, heads=4)
    params = dict(model.named_parameters())
    index = index_from_masks(full_masks(model), model)
    cand = torch.randperm(index.numel, generator=torch.Generator().manual_seed(1))[:500]
    sub, pos = sub_index(index, cand)
    for grids in ("nf4", "fp4", "int8", "int4-g128", "nf4,int4-g128,int8,fp4"):
        whole = floor_geometry(params, index, 64, layout=quant_layout(model), quantizers=grids).select(pos)
        part = floor_geometry(params, sub, 64, layout=quant_layout(model), quantizers=grids)
        for f in ("x0", "bin_width", "move_up", "move_down", "cap_up", "cap_down"):
            assert torch.equal(getattr(whole, f), getattr(part, f)), (grids, f)
