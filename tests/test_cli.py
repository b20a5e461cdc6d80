"""The CLI: --help everywhere, real numbers on the demo, one-line errors with exit code 2 on bad input."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def mansu(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mansu", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


def test_help_on_every_command():
    from mansu.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"demo", "eval", "runs"} <= set(commands)
    for name in commands:
        out = mansu(name, "--help")
        assert out.returncode == 0 and "usage: python -m mansu " + name in out.stdout


def test_eval_demo_prints_accuracies(demo_assets, demo_home):
    out = mansu("eval", "--model", str(demo_assets.model_dir), "--data", str(demo_assets.forget_path), "--json")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and row["n"] == 120 and row["accuracy"] >= 0.99


@pytest.mark.parametrize("mode", ["simulated", "real"])
def test_eval_nf4_prints_the_ptq_gap(demo_assets, mode):
    out = mansu("eval", "--model", str(demo_assets.model_dir), "--data", str(demo_assets.forget_path), "--nf4", mode,
                "--json")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    nf4 = row["nf4"]
    assert out.returncode == 0 and nf4["mode"] == mode and nf4["n_quantized_modules"] == 14  # 2 layers x 7 Linear
    assert nf4["acc_full"] == row["accuracy"] and nf4["gap"] == pytest.approx(nf4["acc_nf4"] - nf4["acc_full"])
    assert nf4["acc_nf4"] >= 0.95 and nf4["ci_low"] <= nf4["gap"] <= nf4["ci_high"]
    if mode == "simulated":  # the human-readable form once (each call evaluates the model twice)
        text = mansu("eval", "--model", str(demo_assets.model_dir), "--data", str(demo_assets.forget_path), "--nf4",
                     mode)
        assert "14 modules quantized" in text.stdout and "PTQ gap" in text.stdout


def test_demo_command_reports_base_accuracies(demo_assets, demo_home):
    out = mansu("demo", "--json", env_extra={"MANSU_HOME": str(demo_home)})
    accs = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and accs["forget"]["accuracy"] >= 0.99 and accs["retain"]["accuracy"] >= 0.99


def one_line_error(out):
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("Loading weights")]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr
    return lines[0]


def test_bad_inputs_end_in_one_line(tmp_path, demo_assets):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 7}\n')
    assert "bad.jsonl:1: field 'answer'" in one_line_error(mansu("eval", "--model", str(demo_assets.model_dir),
                                                                 "--data", str(bad)))
    assert "data file not found" in one_line_error(mansu("eval", "--model", "demo", "--data",
                                                         str(tmp_path / "none.jsonl")))
    assert "model folder not found" in one_line_error(mansu("eval", "--model", str(tmp_path / "nomodel"), "--data",
                                                            str(demo_assets.forget_path)))
    assert "no config.json" in one_line_error(mansu("eval", "--model", str(tmp_path), "--data",
                                                    str(demo_assets.forget_path)))


def test_not_a_causal_lm(tmp_path, demo_assets):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=64).save_pretrained(tmp_path / "vit")
    msg = one_line_error(mansu("eval", "--model", str(tmp_path / "vit"), "--data", str(demo_assets.forget_path)))
    assert "'vit' is not a causal language model" in msg


def test_runs_lists_store(tmp_path):
    out = mansu("runs", env_extra={"MANSU_RUNS": str(tmp_path / "runs")})
    assert out.returncode == 0 and "no runs under" in out.stdout
