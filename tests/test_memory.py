"""The memory estimate stops a run that would not fit before anything loads or is created (mansu/memory.py)."""

from __future__ import annotations

import pytest

from mansu.memory import check_engine_memory, estimate
from mansu.unlearn.config import UnlearnConfig


def _spec(world, method: str, **kw):
    from mansu.spec import RunSpec

    return RunSpec(model=world["model"], forget=world["forget"], retain=world["retain"],
                   unlearn={"method": method, "steps": 1}, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mansu.testing import write_tiny_world

    return write_tiny_world(tmp_path_factory.mktemp("world"))


def test_a_run_that_does_not_fit_stops_before_its_folder_exists(world, tmp_runs):
    from mansu.pipeline import preflight

    with pytest.raises(ValueError, match=r"graddiff on this model needs ~.* GiB .* but cpu has .* GiB: (use|lower) --"):
        preflight(_spec(world, "graddiff", memory_limit_gb=1e-4))
    assert not tmp_runs.exists() or not any(tmp_runs.iterdir())
    preflight(_spec(world, "graddiff", memory_limit_gb=64))  # the same run fits in 64 GiB


def test_estimate_counts_weights_engine_and_the_attribution_cache(world):
    import torch
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(world["model"])
    gd = estimate(_spec(world, "graddiff"), config, torch.float32)
    mansu = estimate(_spec(world, "mansu"), config, torch.float32)
    assert gd["weights"] == 4 * gd["parameters"] and gd["engine"] == 24 * gd["quantizable"] > 0
    assert mansu["engine"] == 0 and mansu["engine_after_circuit"]  # MANSU is checked again at the circuit's size
    assert 0 < mansu["attribution"] <= 2048 * 2**20


def test_an_8b_llama_graddiff_does_not_fit_80_gb_but_mansu_weights_do():
    """Llama-3.1-8B's layout in bf16, on empty weights: Adam over every weight needs ~170 GB; MANSU's weights and
    attribution cache fit, and its state is checked at the circuit's size (a 30% circuit fits, all weights do not)."""
    import torch
    import transformers as tf

    from mansu.spec import RunSpec

    config = tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                            num_hidden_layers=32, vocab_size=128256, tie_word_embeddings=False)
    spec = RunSpec(model="demo", unlearn={"method": "graddiff"})
    gd = estimate(spec, config, torch.bfloat16)
    assert 160e9 < gd["total"] < 200e9
    mansu = estimate(RunSpec(model="demo", unlearn={"method": "mansu"}), config, torch.bfloat16)
    assert mansu["total"] < 20e9
    cfg = UnlearnConfig(method="mansu", steps=40)
    check_engine_memory(cfg, int(0.4 * mansu["quantizable"]), 80 - mansu["total"] / 2**30, "cuda")
    with pytest.raises(ValueError, match="lower --circuit-target"):
        check_engine_memory(cfg, mansu["quantizable"], 80 - mansu["total"] / 2**30, "cuda")


def test_mansu_peak_counts_its_candidates():
    # the step's peak per circuit coordinate (Mansu.peak_bytes): 18 B, plus 44 B for each coordinate proposed over
    # the run (update_fraction x steps of them: log, its merge, restore buffer); the no-floor ablation holds Adam
    from mansu.unlearn.methods import METHODS

    assert METHODS["mansu"].peak_bytes(UnlearnConfig(method="mansu", steps=40)) == pytest.approx(18 + 44 * 0.08)
    assert METHODS["mansu"].peak_bytes(UnlearnConfig(method="mansu", steps=1000, update_fraction=0.01)) == 18 + 44
    assert METHODS["mansu_no_floor"].peak_bytes(UnlearnConfig(method="mansu_no_floor")) == 40
