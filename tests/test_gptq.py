"""gptq-int4-g128 (mansu.quant.gptq): llmcompressor's GPTQ, run for real in mansu's side environment, read back
without compressed-tensors; the grid it writes onto is mansu's int4-g128 of the same weights.

The side environment is created under the test home on first use (~2 min once, needs PyPI; kept in
.pytest_cache between sessions); MANSU_GPTQ_PYTHON points the tests at an existing one instead."""

from __future__ import annotations

import json

import pytest
import torch

from mansu.quant.alignment import DEFAULT_QUANTIZERS, parse_quantizers
from mansu.quant.base import Quantized
from mansu.quant.gptq import calibration_texts, ensure_env, gptq_quantized, unpack_int4
from mansu.quant.registry import GPTQ, get_quantizer
from mansu.quant.targets import quantizable_modules
from mansu.testing import tiny_llama, toy_records, toy_tokenizer, write_tiny_world


@pytest.fixture(scope="module")
def gptq_python(demo_home):
    return ensure_env(demo_home / "envs" / "gptq")


# ---------------------------------------------------------------- no side environment needed

@pytest.mark.parametrize("rows, cols", [(5, 256), (3, 13), (37, 1)])
def test_unpack_int4_reads_compressed_tensors_packing(rows, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = torch.randint(-8, 8, (rows, cols), generator=torch.Generator().manual_seed(rows), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_to_int32(q, 4), cols), (q + 8).to(torch.uint8))  # weights: along rows
    along_cols = pack_to_int32(q, 4, packed_dim=0)  # zero points: packed along the output axis
    assert torch.equal(unpack_int4(along_cols.T.contiguous(), rows).T, (q + 8).to(torch.uint8))


def test_gptq_is_scored_on_request_but_never_floored_or_diagnosed():
    from mansu.cli import main
    from mansu.spec import RunSpec

    assert GPTQ not in parse_quantizers(DEFAULT_QUANTIZERS, calibrated=True)   # not in the default list
    assert RunSpec(quantizers=f"nf4,{GPTQ}").quantizers == f"nf4,{GPTQ}"     # a run may ask for it
    with pytest.raises(ValueError, match=r"calibrated .* no bin widths .* use int4-g128"):
        parse_quantizers(f"nf4,{GPTQ}")                                        # the floor's and diagnose's parser
    assert main(["diagnose", "--model", "demo", "--quant", GPTQ]) == 2


# ---------------------------------------------------------------- GPTQ in the side environment

def test_gptq_writes_onto_the_int4_g128_grid_of_the_original_weights(gptq_python):
    tok = toy_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden=128, layers=2)  # every Linear's rows are a multiple of 128
    names = list(quantizable_modules(model))
    original = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    int4 = get_quantizer("int4-g128")
    same = total = 0
    with gptq_quantized(model, tok, calibration_texts(toy_records(48)), python=gptq_python) as twin:
        assert sorted(twin.quantized_modules) == sorted(names) and twin.skipped_modules == []
        for n in names:
            rtn = int4.quantize(original[n])
            gptq = model.get_submodule(n).weight.detach()
            scale = rtn.scales.repeat_interleave(128, dim=1)
            zero = rtn.zeros.repeat_interleave(128, dim=1).float()
            codes = torch.round(gptq / scale + zero)  # the codes GPTQ chose, read on RTN's scales and zeros
            assert bool(((codes >= 0) & (codes <= 15)).all()), n
            on_grid = int4.dequantize(Quantized(codes.to(torch.uint8), rtn.scales, rtn.zeros, rtn.shape,
                                                rtn.dtype, "int4-g128"))
            assert torch.equal(gptq, on_grid), n  # exactly a point of the int4-g128 grid of the original weight
            same += int((codes.to(torch.uint8) == rtn.codes).sum())
            total += codes.numel()
    assert 0.5 < same / total < 1.0  # GPTQ's error feedback moves some codes off round-to-nearest, not most
    for n in names:  # restored bit-exactly after the block
        assert torch.equal(model.get_submodule(n).weight, original[n]), n


def test_eval_prints_the_gptq_ptq_gap(gptq_python, tmp_path, monkeypatch, capsys):
    from mansu.cli import main

    monkeypatch.setenv("MANSU_GPTQ_PYTHON", str(gptq_python))
    world = write_tiny_world(tmp_path, hidden=128)
    argv = ["eval", "--model", world["model"], "--data", world["forget"], "--tokenizer", "fast",
            "--quant", f"int4-g128,{GPTQ}", "--calibration", world["retain"], "--json"]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    entry = row["quant"][GPTQ]
    assert entry["mode"] == "calibrated" and entry["n_quantized_modules"] == 14 and entry["skipped_modules"] == []
    assert entry["gap"] == pytest.approx(entry["acc_nf4"] - row["accuracy"])
    assert entry["n"] == row["n"] == 4
    assert row["quant"]["int4-g128"]["mode"] == "simulated"
    assert main(argv[:-4] + [GPTQ]) == 2  # no calibration data: one line, before the model loads
    assert "--calibration" in capsys.readouterr().err
