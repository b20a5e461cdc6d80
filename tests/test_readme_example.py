"""The README's one-run example gives the documented result: `mansu run --demo --method mansu --base-alignment
nf4-grid` (the demo settings, seed 0) forgets and its forgetting survives NF4 (the forgetting and PTQ-gap
properties pass), as the README says; retain and structural erasure are reported there as measured (they fail
under the relative scorecard on this seed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> list[str]:
    """The README's one-run command line, as written there (the CLI tour's `run --demo --method mansu` line)."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines() if "run --demo --method mansu" in line]
    assert len(lines) == 1, lines
    return lines[0].split("#")[0].split()


def test_the_readme_one_run_example_forgets_and_survives_nf4(demo_assets, demo_home, tmp_path):
    command = readme_example()
    assert command[:2] == [".venv/bin/mansu", "run"]
    env = {**os.environ, "MANSU_HOME": str(demo_home), "MANSU_RUNS": str(tmp_path / "runs")}
    out = subprocess.run([sys.executable, "-m", "mansu", *command[1:], "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    card = json.loads(out.stdout.strip().splitlines()[-1])
    summary = {name: (p["status"], p["value"], p["threshold"]) for name, p in card["properties"].items()}
    assert card["properties"]["forgetting"]["status"] == "pass", summary
    assert card["properties"]["ptq_gap"]["status"] == "pass", summary
