"""One model copy at rest (issue 10 items 3, 5, 6): the unlearning writes into the loaded base and restores it
bit-exactly, no model is deep-copied, twins are the model itself, a run stores a sparse update that rebuilds the
model bit-exactly (`mansu export`), --from-run children point at their parent's artifacts, circuit masks are stored
per node, and device_map="auto" either keeps every parameter in memory or is refused before loading."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

from mansu.runs import layout


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (torch.equal calls -0.0 and 0.0 equal; bit equality does not)."""
    t = t.detach().contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def _same_bits(a: dict[str, torch.Tensor], model) -> list[str]:
    """Names of `model`'s parameters whose bits differ from `a` (empty: bit-identical)."""
    return [n for n, p in model.named_parameters() if not torch.equal(_bits(a[n]), _bits(p))]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from mansu.testing import write_tiny_world

    return write_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture
def no_model_deepcopy(monkeypatch):
    """copy.deepcopy of any torch module raises for the duration of the test."""
    original = copy.deepcopy

    def guarded(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError(f"copy.deepcopy of a {type(obj).__name__}: mansu must not copy models")
        return original(obj, *args, **kwargs)
    monkeypatch.setattr(copy, "deepcopy", guarded)


def _spec(world, **kw):
    from mansu.spec import RunSpec

    unlearn = {"method": "mansu", "steps": 2, "batch_size": 4, "k": 2, "n_fisher": 4, "update_fraction": 0.01,
               "epsilon": 1e6, **kw.pop("unlearn", {})}
    return RunSpec(model=world["model"], forget=world["forget"], retain=world["retain"], unlearn=unlearn,
                   attribution_records=4, ig_steps=2, **kw)


# ---------------------------------------------------------------- restore buffer

@pytest.mark.parametrize("method", ["mansu", "graddiff"])
def test_unlearning_in_place_then_revert_is_bit_exact(method):
    from mansu.testing import tiny_llama, toy_records, toy_tokenizer
    from mansu.unlearn.config import UnlearnConfig
    from mansu.unlearn.data import encode_records
    from mansu.unlearn.engine import run_unlearning
    from mansu.unlearn.params import recording

    tok = toy_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden=64)
    base = _snapshot(model)
    cfg = UnlearnConfig(method=method, steps=3, batch_size=4, k=2, n_fisher=4, update_fraction=0.05, lr=1e-3,
                        epsilon=1e6)
    with recording(model) as restore:
        run_unlearning(model, encode_records(tok, toy_records(8)), encode_records(tok, toy_records(8, seed=1)), cfg)
    changed = _same_bits(base, model)
    assert changed and set(changed) == set(restore.touched())          # the model itself was written, all recorded
    touched = sum(base[n].numel() if i is None else i.numel() for n, i in restore.touched().items())
    assert restore.nbytes() <= 12 * touched                             # <= 12 B per touched fp32 coordinate
    if method == "mansu":                                               # sparse: far below a copy of the weights
        assert restore.nbytes() < 0.5 * sum(base[n].numel() * 4 for n in restore.touched())
    restore.revert(model)
    assert _same_bits(base, model) == []


def test_restore_buffer_merges_writes_and_keeps_first_values():
    from mansu.unlearn.params import ParamIndex, apply_update, put_values, recording

    lin = torch.nn.Linear(64, 64, bias=False)
    base = _snapshot(lin)
    flat = torch.arange(64 * 64)
    idx = ParamIndex(("weight",), (flat,), ((64, 64),))
    with recording(lin) as restore:
        delta = torch.zeros(flat.numel())
        delta[[3, 5]] = 1.0
        apply_update(lin, idx, delta)                                   # sparse: 2 coordinates
        put_values(lin, {"weight": (torch.tensor([5, 9]), torch.tensor([7.0, 8.0]))})  # 5 again, 9 new
        assert restore.touched()["weight"].tolist() == [3, 5, 9]
        apply_update(lin, idx, torch.full((flat.numel(),), 0.5))        # dense: becomes a whole-tensor copy
        assert restore.touched()["weight"] is None
    restore.revert(lin)
    assert _same_bits(base, lin) == []


def test_apply_update_refuses_offloaded_parameters():
    from mansu.unlearn.params import ParamIndex, apply_update

    lin = torch.nn.Linear(4, 4, bias=False, device="meta")
    with pytest.raises(ValueError, match="offloaded by accelerate"):
        apply_update(lin, ParamIndex(("weight",), (torch.arange(16),), ((4, 4),)), torch.ones(16))


# ---------------------------------------------------------------- pipeline: no copy, sparse update, export, restore

def test_pipeline_writes_into_the_base_exports_bit_exactly_and_restores(tiny_world, tmp_runs, tmp_path,
                                                                       no_model_deepcopy):
    from mansu.commands.export import handle, rebuild_model
    from mansu.models.loading import load_model
    from mansu.pipeline import STAGE_FUNCS, STAGES, BaseCache, Context, start_run
    from mansu.spec import RunSpec
    from mansu.unlearn.nf4_model import align_base

    with pytest.raises(AssertionError, match="must not copy"):  # the guard is live
        copy.deepcopy(torch.nn.Linear(2, 2))
    spec = _spec(tiny_world, base_alignment="nf4-grid", attribution=False)
    run = start_run(spec)
    ctx = Context(run, RunSpec.from_dict(spec.to_dict()), BaseCache())
    for stage in STAGES:
        STAGE_FUNCS[stage](ctx)
    model = ctx.cache.model
    assert ctx.unlearned is model and ctx.cache.restore is not None    # the unlearned model IS the base object
    unlearned = _snapshot(model)

    rebuilt = rebuild_model(run)                                        # base + model_update.safetensors
    assert _same_bits(unlearned, rebuilt.model) == []
    handle(argparse.Namespace(run=run.name, out=str(tmp_path / "exported"), device="cpu"))
    assert _same_bits(unlearned, load_model(tmp_path / "exported").model) == []

    fresh = load_model(tiny_world["model"], dtype=spec.dtype).model
    align_base(fresh, spec.base_alignment, spec.config.blocksize)
    assert _same_bits(_snapshot(fresh), model) != []                    # still unlearned ...
    ctx.base()                                                          # ... until the base is asked for
    assert _same_bits(_snapshot(fresh), model) == [] and ctx.cache.restore is None


def test_export_rejects_bad_input_before_loading(tiny_world, tmp_runs, tmp_path):
    from mansu.commands.export import handle
    from mansu.pipeline import start_run

    run = start_run(_spec(tiny_world))
    with pytest.raises(FileNotFoundError, match="no model update"):
        handle(argparse.Namespace(run=run.name, out=str(tmp_path / "x"), device="cpu"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    with pytest.raises(ValueError, match="not an empty folder"):
        handle(argparse.Namespace(run=run.name, out=str(tmp_path / "full"), device="cpu"))
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- --from-run pointers, per-node masks

def test_from_run_child_points_at_parent_artifacts(tiny_world, tmp_runs, no_model_deepcopy):
    from mansu.attribution.circuit import circuit_parameter_masks
    from mansu.attribution.serialize import load_circuit
    from mansu.models.loading import load_model
    from mansu.pipeline import child_spec, run_pipeline, start_run
    from mansu.runs.store import artifact
    from mansu.viz.artifacts import load_graph

    parent = start_run(_spec(tiny_world))
    run_pipeline(parent)
    # the tiny world is seeded and finds a circuit; a skip here would hide the per-node masks and the pointers
    assert json.loads((parent / layout.CIRCUIT).read_text()).get("status", "ok") == "ok"
    assert not (parent / layout.CIRCUIT_MASKS).exists()                # masks per node, inside circuit.json
    circuit, masks = load_circuit(parent)
    expected = circuit_parameter_masks(load_model(tiny_world["model"]).model, circuit)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], expected[k]) for k in expected)

    child = start_run(child_spec(parent.name, kappa=2.0))
    assert not (child / layout.CIRCUIT).exists() and not layout.attribution_json(child, "before").exists()
    assert artifact(child, layout.CIRCUIT) == parent / layout.CIRCUIT
    assert load_graph(child, "before") is not None                     # the app's reader finds the parent's graph
    run_pipeline(child)
    assert json.loads((child / layout.CAD).read_text())["status"] == "ok"
    assert layout.attribution_json(child, "after_fp").is_file()         # the child's own stages are its own files


# ---------------------------------------------------------------- quantized twins are the model itself

def test_twins_compute_quantized_without_changing_parameters(no_model_deepcopy):
    from mansu.quant.twin import nf4_twin, quantized
    from mansu.testing import tiny_llama

    model = tiny_llama(hidden=64)
    base = _snapshot(model)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        full = model(ids).logits
        with quantized(model, "nf4") as twin:
            assert twin.model is model and _same_bits(base, model) == []  # parameters untouched at rest
            sim = model(ids).logits
            rounded = {n: twin.rounded(f"{n}.weight") for n in twin.quantized_modules}
        with nf4_twin(model, "real") as real:
            real_logits = model(ids).logits
            assert len(real.quantized_modules) == len(rounded)
    assert _same_bits(base, model) == [] and not torch.equal(sim, full)
    manual = tiny_llama(hidden=64)  # the same weights, rounded by hand
    with torch.no_grad():
        for n, w in rounded.items():
            manual.get_submodule(n).weight.copy_(w)
        assert torch.equal(manual(ids).logits, sim)
    assert (real_logits - sim).abs().max() < 0.05


# ---------------------------------------------------------------- device_map="auto"

def _split_memory(path) -> dict:
    from mansu.models.loading import load_model

    size = sum(p.numel() * p.element_size() for p in load_model(path).model.parameters())
    return {"cpu": int(size * 0.5)}


def test_device_map_auto_refuses_offload_before_loading(tiny_world, monkeypatch):
    from transformers import AutoModelForCausalLM

    from mansu.models.loading import load_model

    max_memory = _split_memory(tiny_world["model"])

    def never(*args, **kwargs):
        raise AssertionError("weights loaded")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ValueError, match=r"would offload \d+ of \d+ modules to disk .* cannot update offloaded"):
        load_model(tiny_world["model"], device="auto", max_memory=max_memory)


def test_device_map_auto_split_over_cpu_and_disk(tiny_world, tmp_path):
    from mansu.models.loading import load_model
    from mansu.quant.twin import quantized
    from mansu.unlearn.params import apply_update, index_from_masks, recording

    reference = load_model(tiny_world["model"]).model
    lm = load_model(tiny_world["model"], device="auto", max_memory=_split_memory(tiny_world["model"]),
                    allow_offload=True, offload_folder=tmp_path / "offload")
    placed = set(lm.model.hf_device_map.values())
    assert placed == {"cpu", "disk"}, placed
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():                                               # forward-only use works under offload
        assert torch.allclose(lm.model(ids).logits, reference(ids).logits, atol=1e-6)
    params = dict(lm.model.named_parameters())
    on_cpu = next(n for n, p in params.items() if p.device.type == "cpu")  # in memory (the embedding here)
    on_disk = next(n for n, p in params.items() if p.device.type == "meta" and n.endswith("proj.weight"))
    before = params[on_cpu].detach().clone()
    index = index_from_masks({on_cpu: torch.ones_like(before, dtype=torch.bool)})
    with recording(lm.model) as restore:
        apply_update(lm.model, index, torch.full((before.numel(),), 0.25))  # lands on the parameter's own device
    assert torch.equal(params[on_cpu].detach(), before + 0.25)
    restore.revert(lm.model)
    assert torch.equal(_bits(params[on_cpu]), _bits(before))
    off_index = index_from_masks({on_disk: torch.ones(params[on_disk].shape, dtype=torch.bool)})
    with pytest.raises(ValueError, match="offloaded by accelerate"):
        apply_update(lm.model, off_index, torch.ones(params[on_disk].numel()))
    with pytest.raises(ValueError, match="offloaded by accelerate"), quantized(lm.model, "nf4"):
        pass


def test_device_auto_without_offload_runs_the_pipeline(tiny_world, tmp_runs, no_model_deepcopy):
    from mansu.io import read_json
    from mansu.pipeline import run_pipeline, start_run

    run = start_run(_spec(tiny_world, device="auto", attribution=False))
    card = run_pipeline(run)
    assert "forgetting" in card["properties"]
    assert read_json(run / layout.METRICS)["unlearn"]["n_params_touched"] > 0
