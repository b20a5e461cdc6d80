"""Adding a method is one file plus one registry line: a toy method added to a copy of the package runs end to end
through the CLI and through the app's Launch picker (a real backend process), and every list of methods follows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = '''"""A toy method for the registry test: gradient ascent on forget, SGD."""

from mansu.unlearn.methods.gradient import GradientMethod


class Toy(GradientMethod):
    name = "toy"
    summary = "toy: plain gradient ascent"
    objective = "ga"
    demo = {"steps": 2, "lr": 1e-3}
'''
APP_SCRIPT = '''
import json, sys
from streamlit.testing.v1 import AppTest
model, forget, retain = sys.argv[1:4]
at = AppTest.from_file("app.py", default_timeout=120); at.run(); at.switch_page("views/launch.py"); at.run()
options = at.selectbox(key="launch-method").options
at.selectbox(key="launch-method").select_index([o.split(" ")[0] for o in options].index("toy")).run()
at.checkbox(key="launch-demo").uncheck().run()
at.text_input(key="launch-model").input(model)
at.text_input(key="launch-forget").input(forget)
at.text_input(key="launch-retain").input(retain)
at.number_input(key="hp-steps").set_value(2)
at.button[0].click().run()
print(json.dumps({"options": options, "errors": [e.value for e in at.error],
                  "exceptions": [e.value for e in at.exception],
                  "success": [s.value for s in at.success]}))
'''


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    """A copy of the app and package with the toy method added: one new file, one new registry line."""
    root = tmp_path_factory.mktemp("toy_repo")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("mansu", "ui", "views", "assets", ".streamlit"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    shutil.copy2(REPO / "app.py", root / "app.py")
    (root / "mansu/unlearn/methods/toy.py").write_text(TOY)
    registry = root / "mansu/unlearn/methods/__init__.py"
    text = registry.read_text()
    assert text.count('    "ssd",\n') == 1
    registry.write_text(text.replace('    "ssd",\n', '    "ssd",\n    "toy",\n'))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mansu.testing import write_tiny_world

    return write_tiny_world(tmp_path_factory.mktemp("tiny"))


def _env(repo: Path, runs: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(repo), "MANSU_RUNS": str(runs), "MANSU_HOME": str(runs.parent / "home"),
            "HF_HUB_OFFLINE": "1"}


def test_toy_method_runs_through_the_cli(toy_repo, tiny, tmp_path):
    env = _env(toy_repo, tmp_path / "runs")
    helptext = subprocess.run([sys.executable, "-m", "mansu", "run", "--help"], cwd=toy_repo, env=env,
                              capture_output=True, text=True, check=True).stdout
    assert "toy: plain gradient ascent" in helptext
    out = subprocess.run([sys.executable, "-m", "mansu", "run", "--model", tiny["model"], "--forget", tiny["forget"],
                          "--retain", tiny["retain"], "--method", "toy", "--steps", "2", "--no-attribution", "--json"],
                         cwd=toy_repo, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    card = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(card["properties"]) == {"forgetting", "retain", "ptq_gap", "structural_erasure"}
    (run,) = list((tmp_path / "runs").iterdir())
    config = json.loads((run / "config.json").read_text())
    assert config["spec"]["unlearn"]["method"] == "toy"
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [s["method"] for s in steps] == ["toy", "toy"] and steps[-1]["n_nonzero"] > 0


def test_toy_method_is_offered_and_launched_by_the_app(toy_repo, tiny, tmp_path):
    runs = tmp_path / "runs"
    env = _env(toy_repo, runs)
    out = subprocess.run([sys.executable, "-c", APP_SCRIPT, tiny["model"], tiny["forget"], tiny["retain"]],
                         cwd=toy_repo, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert any(o.startswith("toy") for o in seen["options"]) and not seen["errors"] and not seen["exceptions"]
    assert any("started" in s for s in seen["success"])
    deadline = time.time() + 600
    status = {}
    while time.time() < deadline:
        folders = [p for p in runs.iterdir() if not p.name.startswith(".")] if runs.exists() else []
        if folders and (folders[0] / "status.json").is_file():
            status = json.loads((folders[0] / "status.json").read_text())
            if status.get("state") in ("finished", "failed", "cancelled"):
                break
        time.sleep(1)
    assert status.get("state") == "finished", status
    assert json.loads((folders[0] / "config.json").read_text())["spec"]["unlearn"]["method"] == "toy"


def test_every_list_of_methods_derives_from_the_registry():
    from mansu.cli import build_parser
    from mansu.unlearn.config import UnlearnConfig
    from mansu.unlearn.demo_settings import demo_settings
    from mansu.unlearn.methods import METHODS

    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]
    method_flag = next(a for a in run_parser._actions if a.dest == "method")
    assert method_flag.choices == list(METHODS)
    for name, cls in METHODS.items():
        assert UnlearnConfig(method=name).method == name and demo_settings(name)["steps"] == cls.demo["steps"]
        assert all(f in UnlearnConfig.__dataclass_fields__ for f in cls.fields), name
    with pytest.raises(ValueError, match="unknown method 'nope'; accepted are mansu, mansu_no_floor"):
        UnlearnConfig(method="nope")
