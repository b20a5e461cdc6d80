"""The quantizer's view of every weight, checked against a real bitsandbytes NF4 load of five architectures.

For each family (Llama, GPT-2 with Conv1D, Qwen2 with GQA, Gemma, Mistral) a tiny random model gets a floored update
on a random 5% of its quantizable coordinates (floor_geometry + floor_update); base and updated models are saved and
loaded with transformers' BitsAndBytesConfig(nf4) on the CPU, and the packed 4-bit codes of every Linear4bit are
compared: every floored coordinate changed code, no other did.  The nf4-grid aligned base equals its real
dequantized weights, and mansu's survival and alignment reports agree with what the real load shows.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mansu.quant.nf4 import unpack_nf4
from mansu.quant.survival import alignment_report, survival_analysis
from mansu.quant.targets import NATURAL, QuantLayout, quant_layout, quantizable_parameter_names
from mansu.unlearn.floor import floor_geometry, floor_update, verify_code_changes
from mansu.unlearn.nf4_model import round_trip_in_place
from mansu.unlearn.params import apply_update, index_from_masks

bnb = pytest.importorskip("bitsandbytes")

FRACTION = 0.05  # of the quantizable coordinates proposed for a floored move
KAPPA = 0.5      # floor: half a bin width (and always a code change)
ARCHS = ("llama", "gpt2", "qwen2", "gemma", "mistral")


def tiny_model(arch: str, seed: int = 0):
    """A random 2-layer model of `arch` with hidden 64 (GQA where the family has it), fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=64)
    if arch == "gpt2":
        config = tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                               eos_token_id=0)
        return tf.GPT2LMHeadModel(config).eval()
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
    kv = {"llama": 4, "qwen2": 2, "gemma": 1, "mistral": 2}[arch]
    extra = {"head_dim": 16} if arch == "gemma" else {}
    return cls[1](cls[0](num_key_value_heads=kv, **common, **extra)).eval()


def real_nf4(model, tmp_path, tag: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{parameter name: (flat NF4 codes, dequantized weight [out, in])} of every Linear4bit after a real
    transformers + bitsandbytes NF4 load of `model` (saved with save_pretrained)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tmp_path / tag
    model.save_pretrained(folder, safe_serialization=True)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32,
                                                  device_map={"": "cpu"}, use_safetensors=True)
    out = {}
    for name, module in loaded.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            assert state.quant_type == "nf4" and state.blocksize == 64
            numel = int(torch.Size(state.shape).numel())
            codes = unpack_nf4(module.weight.data, numel)
            out[f"{name}.weight"] = (codes, bnb.functional.dequantize_4bit(module.weight.data, state))
    return out


def floored_update(model, layout: QuantLayout, seed: int = 0):
    """(updated deep copy, {name: bool mask of floored coordinates}) for a sparse floored update of `model`."""
    names = quantizable_parameter_names(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    gen = torch.Generator().manual_seed(seed)
    index = index_from_masks({n: torch.rand(p.shape, generator=gen) < FRACTION for n, p in params.items()})
    geo = floor_geometry(params, index, layout=layout)
    proposal = torch.randn(index.numel, generator=gen).sign() * 1e-7  # far below any bin: the floor does the work
    delta, _ = floor_update(proposal, geo, KAPPA)
    updated = copy.deepcopy(model)
    apply_update(updated, index, delta)
    touched = {n: t != 0 for n, t in index.scatter(delta).items()}
    return updated, touched


def code_changes(base_real, new_real, touched, layout: QuantLayout) -> dict[str, int]:
    """Counts from the real loads: floored coordinates that changed code / did not, other coordinates that did."""
    changed = unchanged = collateral = 0
    for name, (c0, _) in base_real.items():
        c1 = new_real[name][0]
        mask = touched.get(name)
        m = torch.zeros_like(c0, dtype=torch.bool) if mask is None else layout.view(name, mask).reshape(-1)
        diff = c0 != c1
        changed += int((diff & m).sum())
        unchanged += int((~diff & m).sum())
        collateral += int((diff & ~m).sum())
    return {"changed": changed, "unchanged": unchanged, "collateral": collateral}


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, tmp_path_factory):
    """(arch, model, its layout, the real NF4 load of the base) for each architecture, built once."""
    model = tiny_model(request.param)
    tmp = tmp_path_factory.mktemp(request.param)
    return request.param, model, quant_layout(model), real_nf4(model, tmp, "base"), tmp


def test_layout_names_exactly_the_conv1d_weights(loaded):
    arch, model, layout, base_real, _ = loaded
    names = quantizable_parameter_names(model)
    assert set(base_real) == set(names)  # the real load quantizes exactly mansu's list
    if arch == "gpt2":
        assert layout.transposed == set(names) and len(names) == 2 * 4  # c_attn, c_proj, c_fc, mlp c_proj
    else:
        assert layout == NATURAL
    for name in names:
        w = dict(model.named_parameters())[name]
        assert base_real[name][1].shape == layout.view(name, w).shape  # [out, in], as bitsandbytes stores it
        assert torch.equal(layout.unview(name, layout.view(name, w)), w)


def test_floored_codes_change_under_a_real_nf4_load(loaded):
    arch, model, layout, base_real, tmp = loaded
    updated, touched = floored_update(model, layout)
    n_floored = sum(int(m.sum()) for m in touched.values())
    proposed = FRACTION * sum(m.numel() for m in touched.values())
    assert n_floored > 0.6 * proposed  # most proposals are floorable (absmax elements and edge cells are not)
    counts = code_changes(base_real, real_nf4(updated, tmp, "floored"), touched, layout)
    assert counts == {"changed": n_floored, "unchanged": 0, "collateral": 0}  # 100% of floored codes, 0 others
    names = quantizable_parameter_names(model)
    base_p, new_p = dict(model.named_parameters()), dict(updated.named_parameters())
    assert verify_code_changes(base_p, new_p, touched, layout=layout) == counts  # mansu's own check agrees
    report = survival_analysis({n: base_p[n] for n in names}, {n: new_p[n] for n in names}, names, layout=layout)
    overall = report["overall"]
    assert overall["n_updated"] == n_floored and overall["frac_code_changed"] == 1.0
    assert overall["n_code_changed_updated"] == counts["changed"]
    assert overall["n_code_changed_not_updated"] == counts["collateral"] == 0
    assert report["transposed"] == sorted(layout.transposed)


def test_untransposed_blocks_break_gpt2_under_a_real_load(tmp_path):
    """The failure this layout fixes (issue 12): Conv1D blocks formed on the stored [in, out] layout."""
    model = tiny_model("gpt2")
    layout = quant_layout(model)
    updated, touched = floored_update(model, NATURAL)
    counts = code_changes(real_nf4(model, tmp_path, "base"), real_nf4(updated, tmp_path, "new"), touched, layout)
    assert counts["unchanged"] > 0.1 * counts["changed"] and counts["collateral"] > 0


def test_nf4_grid_alignment_sits_on_the_real_grid(loaded):
    arch, model, layout, base_real, tmp = loaded
    names = quantizable_parameter_names(model)
    natural = alignment_report({n: p.detach() for n, p in model.named_parameters()}, names, layout=layout)
    assert natural["overall"]["frac_on_grid"] < 0.05
    aligned = copy.deepcopy(model)
    round_trip_in_place(aligned)
    aligned_real = real_nf4(aligned, tmp, "aligned")
    params = dict(aligned.named_parameters())
    n_on = n_all = 0
    for name in names:
        view = layout.view(name, params[name].detach())
        n_on += int((view == aligned_real[name][1]).sum())
        n_all += view.numel()
        assert torch.equal(aligned_real[name][0], base_real[name][0]), name  # alignment keeps every code
    assert n_on == n_all  # 100% of the weights equal their real dequantized NF4 values
    report = alignment_report({n: p.detach() for n, p in params.items()}, names, layout=layout)
    assert report["overall"]["frac_on_grid"] == 1.0  # and mansu's report says so


def test_simulated_twin_equals_the_real_dequantized_weights(loaded):
    from mansu.quant.twin import nf4_twin

    arch, model, layout, base_real, _ = loaded
    with nf4_twin(model, "simulated") as sim:
        twin = {name: sim.rounded(name) for name in base_real}
    for name, (_, deq) in base_real.items():
        assert torch.equal(layout.view(name, twin[name]), deq), name


def test_mansu_engine_on_gpt2_changes_every_touched_code_under_a_real_load(tmp_path):
    """The whole MANSU method (projection, Fisher budget, floor) on a GPT-2 with Conv1D weights."""
    from mansu.data.records import MCQRecord
    from mansu.models.demo import build_tokenizer
    from mansu.unlearn.config import UnlearnConfig
    from mansu.unlearn.data import encode_records
    from mansu.unlearn.engine import run_unlearning

    names, colors = ["Zorb", "Quil", "Marn", "Tesk"], ["red", "blue", "green", "amber"]
    tok = build_tokenizer([" ".join(names + colors) + " Where is from ? Answer :"])
    records = [MCQRecord(f"Where is {names[i % 4]} from ?", tuple(colors), i % 4) for i in range(12)]
    model = tiny_model("gpt2")
    model.resize_token_embeddings(len(tok))
    updated = copy.deepcopy(model)
    config = UnlearnConfig(method="mansu", steps=2, batch_size=4, k=4, n_fisher=6, update_fraction=0.02, epsilon=1e6)
    result = run_unlearning(updated, encode_records(tok, records[:6]), encode_records(tok, records[6:]), config)
    base_p, new_p = dict(model.named_parameters()), dict(updated.named_parameters())
    touched = {n: new_p[n] != base_p[n] for n in result.index.names}
    n_touched = sum(int(m.sum()) for m in touched.values())
    assert n_touched > 0 and set(result.index.names) == set(quant_layout(model).transposed)
    counts = code_changes(real_nf4(model, tmp_path, "base"), real_nf4(updated, tmp_path, "new"), touched,
                          quant_layout(model))
    assert counts == {"changed": n_touched, "unchanged": 0, "collateral": 0}


def test_run_on_gpt2_nf4_grid_base_reports_what_a_real_load_shows(tmp_path):
    """`mansu run` end to end on a GPT-2 (Conv1D) with the nf4-grid base: the saved model's floored codes all change
    under a real load, nothing else does, and survival.json / metrics.json say the same."""
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from mansu.models.demo import build_tokenizer
    from mansu.unlearn.nf4_model import align_base

    names, colors = ["Zorb", "Quil", "Marn", "Tesk"], ["red", "blue", "green", "amber"]
    tok = build_tokenizer([" ".join(names + colors) + " Where is from ? Answer :"])
    model = tiny_model("gpt2")
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    for split, who in (("forget", names[:2]), ("retain", names[2:])):
        rows = [{"question": f"Where is {n} from ?", "choices": colors, "answer": j} for n in who for j in range(2)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", str(tmp_path / "gpt2"), "--forget", str(tmp_path / "forget.jsonl"), "--retain",
            str(tmp_path / "retain.jsonl"), "--method", "mansu", "--base-alignment", "nf4-grid", "--no-attribution",
            "--steps", "2", "--update-fraction", "0.02", "--k", "2", "--n-fisher", "4", "--batch-size", "2", "--json",
            "--save-model"]
    env = {**os.environ, "MANSU_RUNS": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "mansu", "run", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = [p for p in (tmp_path / "runs").iterdir() if (p / "survival.json").is_file()]
    base = copy.deepcopy(model)
    align_base(base, "nf4-grid")
    new = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    layout, qnames = quant_layout(base), quantizable_parameter_names(base)
    b, n = dict(base.named_parameters()), dict(new.named_parameters())
    touched = {k: n[k] != b[k] for k in qnames}
    n_touched = sum(int(m.sum()) for m in touched.values())
    base_real = real_nf4(base, tmp_path, "base")
    assert n_touched > 0
    assert code_changes(base_real, real_nf4(new, tmp_path, "new"), touched, layout) == {
        "changed": n_touched, "unchanged": 0, "collateral": 0}
    assert all(torch.equal(layout.view(k, b[k].detach()), base_real[k][1]) for k in qnames)  # base on the real grid
    survival = json.loads((run / "survival.json").read_text())["overall"]
    assert survival["n_updated"] == n_touched and survival["frac_code_changed"] == 1.0
    assert survival["n_code_changed_not_updated"] == 0
    assert json.loads((run / "metrics.json").read_text())["base_alignment"]["frac_on_grid"] == 1.0
