"""Shared fixtures: the demo world and model (built once per test session), tiny random models, temp run roots.

Tests never touch the network: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# The demo model takes about a minute to train: keep it between sessions in pytest's cache folder.
TEST_HOME = Path(os.environ.get("MANSU_TEST_HOME", REPO / ".pytest_cache" / "mansu-home"))


@pytest.fixture(scope="session")
def demo_home() -> Path:
    return TEST_HOME


@pytest.fixture(scope="session")
def demo_assets(demo_home):
    """The demo world and model under the test home (built on first use)."""
    from mansu.models.demo import ensure_demo

    return ensure_demo(demo_home / "demo")


@pytest.fixture(scope="session")
def demo_lm(demo_assets):
    """The demo model and tokenizer; shared, so never modify it in place (deep-copy first)."""
    from mansu.models.loading import load_model

    return load_model(demo_assets.model_dir)


@pytest.fixture(scope="session")
def demo_records(demo_assets):
    """Forget, retain and probe MCQ records of the demo world."""
    from mansu.models.demo import load_demo_split

    return {split: load_demo_split(demo_assets, split) for split in ("forget", "retain", "probe")}


@pytest.fixture
def tmp_runs(tmp_path, monkeypatch) -> Path:
    """An empty run store for one test (MANSU_RUNS points at it)."""
    root = tmp_path / "runs"
    monkeypatch.setenv("MANSU_RUNS", str(root))
    return root


def tiny_llama(vocab_size: int = 64, *, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int | None = None,
               seed: int = 0):
    """A random-init LlamaForCausalLM small enough for exhaustive checks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, intermediate_size=2 * hidden, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on the shared 2-core CPU, 2 OpenMP threads ran attribution passes up to
    20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
