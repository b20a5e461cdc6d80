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
# The demo model takes a minute or more to train: scripts/test.sh builds it here before pytest starts, and it is
# kept between sessions in pytest's cache folder.
TEST_HOME = Path(os.environ.get("MANSU_TEST_HOME", REPO / ".pytest_cache" / "mansu-home"))


@pytest.fixture(scope="session")
def demo_home() -> Path:
    return TEST_HOME


@pytest.fixture(scope="session")
def demo_assets(demo_home):
    """The demo world and model under the test home, built beforehand by scripts/test.sh (never under a test's
    timeout). MANSU_TEST_BUILD_DEMO=1 lets the fixture build it instead."""
    from mansu.models.demo import demo_assets as assets_at
    from mansu.models.demo import ensure_demo, is_complete

    assets = assets_at(demo_home / "demo")
    if is_complete(assets):
        return assets
    if os.environ.get("MANSU_TEST_BUILD_DEMO") == "1":
        return ensure_demo(assets.root)
    pytest.fail(f"no demo model (of the current recipe) under {assets.root}: build it first with scripts/test.sh, "
                f"or `MANSU_HOME={demo_home} .venv/bin/python -m mansu demo --no-eval`, "
                f"or set MANSU_TEST_BUILD_DEMO=1 to let the tests build it", pytrace=False)


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on the shared 2-core CPU, 2 OpenMP threads ran attribution passes up to
    20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
