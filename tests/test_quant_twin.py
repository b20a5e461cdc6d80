"""NF4 twins (simulated and real bitsandbytes) and the PTQ gap with a paired bootstrap CI."""

from __future__ import annotations

import pytest
import torch

from mansu.quant.nf4 import nf4_round_trip
from mansu.quant.targets import quantizable_parameter_names
from mansu.quant.twin import nf4_twin, paired_gap, ptq_gap
from mansu.testing import tiny_llama

bnb = pytest.importorskip("bitsandbytes")

N_RECORDS = 40  # per split: enough to see a flip, small enough for a fast suite
BF16_COMPUTE_TOL = 0.05  # |acc_sim - acc_real|: bitsandbytes' CPU matmul runs in bf16 (docs/nf4.md)


def test_quantizable_names_are_the_linear_layers_without_lm_head():
    model = tiny_llama()
    names = quantizable_parameter_names(model)
    assert len(names) == 2 * 7 and "lm_head.weight" not in names
    assert all(n.endswith("_proj.weight") for n in names)


def test_simulated_twin_rounds_exactly_the_quantizable_weights():
    model = tiny_llama(hidden=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = set(quantizable_parameter_names(model))
    ids = torch.tensor([[1, 2, 3, 4]])
    by_hand = tiny_llama(hidden=64)  # the same weights, every quantizable one rounded by hand
    with torch.no_grad():
        for key in names:
            by_hand.get_parameter(key).copy_(nf4_round_trip(before[key]))
        with nf4_twin(model, "simulated") as twin:
            assert twin.model is model and {f"{m}.weight" for m in twin.quantized_modules} == names
            for key in names:
                assert torch.equal(twin.rounded(key), nf4_round_trip(before[key])), key
            assert torch.equal(model(ids).logits, by_hand(ids).logits)   # the forward computes with RT(W)
            for key, value in model.state_dict().items():  # parameters untouched at rest, inside the block too
                assert torch.equal(value, before[key])
        assert not torch.equal(model(ids).logits, by_hand(ids).logits)  # full precision again after it


@pytest.mark.parametrize("cache_mb", [0, 512])
def test_kept_round_trips_follow_in_place_changes(monkeypatch, cache_mb):
    # a small model's twin keeps its round trips for the block; a weight changed in place inside it (an attack
    # fine-tuning through the twin) is rounded afresh, as the per-forward recomputation would
    import mansu.quant.twin as twin_module

    monkeypatch.setattr(twin_module, "TWIN_CACHE_MB", cache_mb)
    model = tiny_llama(hidden=64)
    key = quantizable_parameter_names(model)[0]
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), nf4_twin(model, "simulated") as twin:
        first = model(ids).logits
        assert torch.equal(model(ids).logits, first)
        model.get_parameter(key).mul_(3.0)
        assert torch.equal(twin.rounded(key), nf4_round_trip(model.get_parameter(key)))
        assert not torch.equal(model(ids).logits, first)


def test_real_twin_weights_dequantize_to_the_simulated_round_trip():
    model = tiny_llama(hidden=64)
    with nf4_twin(model, "simulated") as sim:
        expected = {name: sim.rounded(f"{name}.weight") for name in sim.quantized_modules}
    originals = {name: model.get_submodule(name) for name in expected}
    with nf4_twin(model, "real") as real:  # quantized in memory, on the weights' device (no save/reload)
        assert real.model is model and real.quantized_modules == list(expected)
        for name in real.quantized_modules:
            module = real.model.get_submodule(name)
            assert isinstance(module, bnb.nn.Linear4bit)
            assert module.weight.quant_state.quant_type == "nf4"
            deq = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(deq, expected[name]), name
        assert not isinstance(real.model.lm_head, bnb.nn.Linear4bit)
    assert all(model.get_submodule(name) is module for name, module in originals.items())  # put back


def test_twin_mode_and_blocksize_validation():
    model = tiny_llama()
    with pytest.raises(ValueError, match="simulated, real"):
        nf4_twin(model, "fake")  # raised on the call, before any `with`
    with pytest.raises(ValueError, match="blocksize"):
        nf4_twin(model, "real", blocksize=128)
    with pytest.raises(ValueError, match="blocksize"):
        nf4_twin(model, "simulated", blocksize=3)


def test_paired_gap_uses_the_same_examples():
    full = [True] * 30 + [False] * 10
    same = paired_gap(full, full)
    assert same.gap == 0.0 and same.ci_low == 0.0 and same.ci_high == 0.0
    flipped = paired_gap(full, [True] * 40)  # NF4 recovers all 10 wrong answers
    assert flipped.gap == pytest.approx(0.25) and flipped.acc_nf4 == 1.0
    assert flipped.ci_low > 0.1 and flipped.ci_high < 0.4
    with pytest.raises(ValueError, match="same non-empty"):
        paired_gap(full, full[:-1])


def test_demo_model_simulated_and_real_agree(demo_lm, demo_records):
    from mansu.metrics.accuracy import cloze_texts, continuation_logprobs, mcq_accuracy

    forget, retain = demo_records["forget"][:N_RECORDS], demo_records["retain"][:N_RECORDS]
    sim = ptq_gap(demo_lm.model, demo_lm.tokenizer, forget, retain, "simulated")
    pairs = [(ctx, cont) for rec in forget[:10] for ctx, conts in [cloze_texts(rec)] for cont in conts]
    with nf4_twin(demo_lm.model, "real") as real:
        assert sim.quantized_modules == real.quantized_modules
        for split, records in (("forget", forget), ("retain", retain)):
            s = getattr(sim, split)
            acc_real = mcq_accuracy(real.model, demo_lm.tokenizer, records).accuracy
            assert abs(s.acc_nf4 - acc_real) <= BF16_COMPUTE_TOL
            assert s.n == N_RECORDS and s.ci_low <= s.gap <= s.ci_high
            assert s.gap == pytest.approx(s.acc_nf4 - s.acc_full)
        lp_real = torch.tensor(continuation_logprobs(real.model, demo_lm.tokenizer, pairs))
    # per-choice log-probabilities: real (bf16 compute) vs simulated (fp32) differ far less than NF4 vs full
    with nf4_twin(demo_lm.model) as twin:
        lp_sim = torch.tensor(continuation_logprobs(twin.model, demo_lm.tokenizer, pairs))
    lp_full = torch.tensor(continuation_logprobs(demo_lm.model, demo_lm.tokenizer, pairs))
    assert (lp_sim - lp_real).abs().max() < 0.1
    assert (lp_sim - lp_real).abs().mean() < (lp_sim - lp_full).abs().mean()


def test_grid_aligned_model_has_zero_simulated_ptq_gap(demo_lm, demo_records):
    import copy

    from mansu.unlearn.nf4_model import round_trip_in_place

    aligned = copy.deepcopy(demo_lm.model)  # a test-side copy: the fixture is shared
    round_trip_in_place(aligned)  # NF4(NF4(w)) == NF4(w)
    with nf4_twin(aligned, "simulated") as twin:
        for m in twin.quantized_modules:
            assert torch.equal(twin.rounded(f"{m}.weight"), aligned.get_parameter(f"{m}.weight")), m
    gap = ptq_gap(aligned, demo_lm.tokenizer, demo_records["forget"][:10], demo_records["retain"][:10])
    assert gap.forget.gap == 0.0 and gap.retain.gap == 0.0
