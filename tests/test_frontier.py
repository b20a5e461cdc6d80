"""`mansu sweep frontier` (mansu.science.frontier): on a tiny grid of the demo (GradDiff at one lr and MANSU, 2 steps,
seed 0) the page, the JSON and the figures are written, and every point is its run's own metrics read back; bad
options end in one line before any run or file exists."""

from __future__ import annotations

import json

import pytest

from mansu.cli import main
from mansu.science.frontier import FRONTIER_METHODS, FrontierConfig, settings


@pytest.fixture
def demo_env(demo_assets, demo_home, monkeypatch):
    monkeypatch.setenv("MANSU_HOME", str(demo_home))


def test_quick_sweep_writes_page_json_and_figures_from_the_runs_own_metrics(demo_env, tmp_path, one_torch_thread):
    out = tmp_path / "docs" / "frontiers.md"
    runs = tmp_path / "runs"
    assert main(["sweep", "frontier", "--quick", "--out", str(out), "--runs", str(runs)]) == 0
    for ext in (".md", ".json", ".png", ".svg"):
        assert out.with_suffix(ext).stat().st_size > 500
    data = json.loads(out.with_suffix(".json").read_text())
    points = data["points"]
    assert [(p["group"], p["method"]) for p in points] == [("baseline", "graddiff"), ("mansu", "mansu")]
    for p in points:
        metrics = json.loads((runs / p["run"].rsplit("/", 1)[-1] / "metrics.json").read_text())
        card = json.loads((runs / p["run"].rsplit("/", 1)[-1] / "scorecard.json").read_text())["properties"]
        base, fp, nf4 = (metrics[k]["forget"]["accuracy"] for k in ("base_fp", "unlearned_fp", "unlearned_nf4"))
        chance = metrics["base_fp"]["forget"]["chance"]
        assert (p["forget_fp"], p["forget_nf4"]) == (fp, nf4)
        assert p["forgot_fp"] == pytest.approx((base - fp) / (base - chance), abs=1e-9)
        assert p["forgot_nf4"] == pytest.approx((base - nf4) / (base - chance), abs=1e-9)
        assert p["ptq_gap"] == pytest.approx(p["forgot_fp"] - p["forgot_nf4"], abs=1e-9)
        assert p["retain_fp"] == metrics["unlearned_fp"]["retain"]["accuracy"]
        assert (p["params_touched"], p["n_coordinates"]) == (metrics["unlearn"]["n_params_touched"],
                                                             metrics["unlearn"]["n_coordinates"])
        assert p["holds"] == all(card[h]["pass"] for h in ("forgetting", "retain", "ptq_gap"))
        assert json.loads((runs / p["run"].rsplit("/", 1)[-1] / "config.json").read_text())["spec"]["unlearn"][
            "steps"] == 2
    graddiff = points[0]
    assert graddiff["changes"]["lr"] == 1e-3 and graddiff["forgot_fp"] > 0.1  # lr 1e-3 forgets even in 2 steps
    assert graddiff["forgot_nf4"] < graddiff["forgot_fp"]  # ... and the NF4-grid base takes part of it back
    page = out.read_text()
    assert "## Verdict" in page and "graddiff lr 0.001" in page and "frontiers.png" in page
    assert ("Shown on this grid" in page) == (not graddiff["holds"])

    merged = tmp_path / "merged" / "frontiers.md"  # --merge alone: the same points, no new run
    assert main(["sweep", "frontier", "--methods", "", "--mansu-fractions", "", "--fisher-epsilons", "",
                 "--merge", str(out.with_suffix(".json")), "--out", str(merged), "--runs", str(runs)]) == 0
    again = json.loads(merged.with_suffix(".json").read_text())
    assert again["points"] == points and len(list(runs.iterdir())) == len(points)
    assert again["commands"] == data["commands"] and "--quick" in merged.read_text()


@pytest.mark.parametrize("flags, message", [
    (["--methods", "mansu"], "--methods: mansu not lr-driven baselines"),
    (["--methods", "sure"], "accepted are"),
    (["--lrs", "0,1e-4"], "--lrs: 0.0 not accepted"),
    (["--lrs", "fast"], "--lrs 'fast' is not a comma-separated list of float values"),
    (["--seeds", ""], "--seeds '' names no value"),
    (["--steps", "0"], "--steps: 0 not accepted"),
    (["--out", "frontiers.txt"], "--out must be a markdown file ending in .md"),
    (["--threads", "0"], "--threads must be in [1, 256]"),
    (["--fisher-epsilons", "-1"], "--fisher-epsilons: -1.0 not accepted"),
    (["--methods", "", "--mansu-fractions", "", "--fisher-epsilons", ""], "nothing to plot"),
    (["--merge", "missing.json"], "missing.json"),
    (["--model-seed", "-1"], "--model-seed must be an integer in [0, "),
])
def test_bad_options_end_in_one_line_before_anything_is_written(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    argv = ["sweep", "frontier", "--out", str(tmp_path / "f.md"), "--runs", str(runs), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs folder, no page


def test_the_default_grid_covers_every_baseline_lr_and_seed_and_pairs_the_fisher_runs():
    cfg = FrontierConfig()
    plan = settings(cfg)
    base = [s for s in plan if s.group == "baseline"]
    assert len(base) == len(cfg.methods) * len(cfg.lrs) * len(cfg.steps) * len(cfg.seeds)
    assert {s.method for s in base} <= set(FRONTIER_METHODS) and "mansu" not in FRONTIER_METHODS
    fisher = [s for s in plan if s.group == "fisher"]
    assert {s.method for s in fisher} == {"mansu", "mansu_no_fisher"}
    for seed in cfg.mansu_seeds:  # each bounded run has its unbounded twin: same changes but epsilon, same seed
        pair = [s for s in fisher if s.seed == seed]
        free = next(s for s in pair if s.method == "mansu_no_fisher")
        assert all({k: v for k, v in s.changes.items() if k != "epsilon"} == free.changes for s in pair)


def test_the_model_seed_reaches_every_runs_config_and_the_command_line(tmp_path):
    from mansu.cli import build_parser
    from mansu.commands.sweep import frontier_command, frontier_config
    from mansu.pipeline import start_run
    from mansu.runs.store import read_config
    from mansu.science.frontier import specs

    args = build_parser().parse_args(["sweep", "frontier", "--quick", "--model-seed", "3", "--mansu-steps", "4"])
    cfg = frontier_config(args)
    plan = settings(cfg)
    runs = [start_run(spec, root=tmp_path) for spec in specs(cfg, plan)]  # the runs frontier_sweep would make
    assert [read_config(run)["spec"]["model_seed"] for run in runs] == [3, 3] and all("-m3-" in r.name for r in runs)
    assert "--model-seed 3" in frontier_command(args)
    assert plan[-1].label == "mansu update_fraction 0.002, 4 steps"  # MANSU step grids stay apart when merged
    plain = frontier_config(build_parser().parse_args(["sweep", "frontier", "--quick"]))
    assert {spec.model_seed for spec in specs(plain, settings(plain))} == {0}
