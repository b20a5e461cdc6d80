"""load_model: NaN/Inf weights are refused at load (one error line through the CLI, exit 2), and --tokenizer
loads a saved tokenizer exactly (AutoTokenizer rebuilds a word-level tokenizer saved with a Qwen2 model as BPE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from mansu.models.loading import check_finite_weights, load_model

WORDS = "Where is Zorb Quil from ? red blue green amber Answer :"
RECORDS = [{"question": f"Where is {n} from ?", "choices": ["red", "blue", "green", "amber"], "answer": i % 4}
           for i, n in enumerate(["Zorb", "Quil"] * 2)]


def _save_tiny(folder, arch: str = "qwen2", poison: tuple[str, int, float] | None = None):
    """A random 1-layer model of `arch` with a word-level tokenizer, saved; `poison` = (parameter, flat index,
    value) written into one weight before saving.  Returns (folder, the original tokenizer)."""
    import transformers as tf

    from mansu.models.demo import build_tokenizer

    tok = build_tokenizer([WORDS])
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    model = (tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)) if arch == "qwen2"
             else tf.LlamaForCausalLM(tf.LlamaConfig(**common)))
    if poison is not None:
        name, index, value = poison
        with torch.no_grad():
            dict(model.named_parameters())[name].view(-1)[index] = value
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder, tok


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mansu", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "mcq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_eval_refuses_a_model_with_a_nan_weight(tmp_path, data_file):
    name = "model.layers.0.mlp.down_proj.weight"
    folder, _ = _save_tiny(tmp_path / "nan", "llama", poison=(name, 17, float("nan")))
    out = _cli("eval", "--model", str(folder), "--data", str(data_file))
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0] and "1 non-finite" in errors[0] and "1 NaN" in errors[0]
    assert "accuracy" not in out.stdout


def test_inf_weight_is_named_with_its_counts(tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    folder, _ = _save_tiny(tmp_path / "inf", "qwen2", poison=(name, 3, float("-inf")))
    with pytest.raises(ValueError, match=rf"{name} has 1 non-finite values of 4096 \(0 NaN, 1 Inf\)"):
        load_model(folder, tokenizer="fast")


def test_finite_check_reports_the_first_bad_tensor_and_counts_the_rest():
    from mansu.testing import tiny_llama

    model = tiny_llama()
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["model.layers.0.mlp.up_proj.weight"][0, :2] = float("nan")
        params["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj\.weight has 2 non-finite .*1 more tensors"):
        check_finite_weights(model, "tiny")
    with torch.no_grad():
        params["model.layers.0.mlp.up_proj.weight"][0, :2] = 0.0
        params["model.layers.1.mlp.up_proj.weight"][0, 0] = 0.0
    check_finite_weights(model, "tiny")  # finite again: no error


def test_tokenizer_fast_and_file_load_exactly_as_saved(tmp_path, data_file):
    folder, original = _save_tiny(tmp_path / "qwen", "qwen2")
    text = RECORDS[0]["question"] + " red"
    expected = original(text)["input_ids"]
    assert len(expected) == 1 + len(text.split())  # BOS + one id per word
    for choice in ("fast", str(folder / "tokenizer.json")):
        tok = load_model(folder, tokenizer=choice).tokenizer
        assert tok(text)["input_ids"] == expected, choice
    assert load_model(folder, tokenizer="fast").tokenizer.pad_token == "[PAD]"  # special tokens kept too
    assert load_model(folder, tokenizer=str(folder)).tokenizer is not None  # a folder: AutoTokenizer on it
    out = _cli("eval", "--model", str(folder), "--data", str(data_file), "--tokenizer", "fast", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["n"] == len(RECORDS)


def test_bad_tokenizer_choice_is_one_error_line(tmp_path, data_file):
    folder, _ = _save_tiny(tmp_path / "m", "llama")
    with pytest.raises(ValueError, match="'fast'"):
        load_model(folder, tokenizer=str(tmp_path / "missing"))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer 'fast' needs"):
        load_model(folder, tokenizer="fast")
    out = _cli("attribute", "--model", str(folder), "--data", str(data_file), "--tokenizer", "nope")
    assert out.returncode == 2 and out.stderr.startswith("error: tokenizer 'nope' not found")
