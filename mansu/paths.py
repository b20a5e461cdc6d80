"""Where mansu keeps its files: MANSU_HOME (default ~/.cache/mansu) holds the demo world, the demo model and runs."""

import os
from pathlib import Path


def mansu_home() -> Path:
    """The cache root; `MANSU_HOME` overrides `~/.cache/mansu`."""
    return Path(os.environ.get("MANSU_HOME") or Path.home() / ".cache" / "mansu").expanduser()


def runs_root() -> Path:
    """The folder holding one sub-folder per run; `MANSU_RUNS` overrides `<MANSU_HOME>/runs`."""
    return Path(os.environ.get("MANSU_RUNS") or mansu_home() / "runs").expanduser()


def demo_root(model_seed: int = 0) -> Path:
    """The folder holding the demo world and the demo model trained with `model_seed`: `demo` for seed 0 (the
    model docs/results.md and the README measure), `demo-seed<N>` beside it for the others."""
    return mansu_home() / ("demo" if model_seed == 0 else f"demo-seed{model_seed}")
