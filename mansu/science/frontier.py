"""Baselines as frontiers (issue 13, item 6) and the Fisher bound doing its job (item 7), on the demo world.

Every point is one normal run of the pipeline (`mansu.pipeline.run_pipeline`, the entry point `compare` uses) on
the NF4-grid-aligned base of the demo model trained with `model_seed` (0: the demo model; 3: the held-out model
the demo settings are chosen on, docs/demo_search.md section 6), with the method's demo settings
(mansu.unlearn.demo_settings) except the swept ones:

    baselines  each lr-driven baseline (FRONTIER_METHODS) x learning rate x step count x seed
    mansu      MANSU (its demo settings) x update_fraction x seed
    fisher     MANSU at a larger update_fraction and no retain term, without the bound (mansu_no_fisher) and with
               it at each epsilon of `fisher_epsilons`, x seed

A point's numbers are the scorecard's (mansu.scorecard), relative to chance c and the base's headroom H = base - c:

    forgot(x)       = (forget(base) - forget(x)) / H_forget       x = fp or NF4 (the scorecard's "forgetting")
    retain_lost(x)  = (retain(base) - retain(x)) / H_retain       (the scorecard's "retain", fp)
    ptq_gap         = (forget(NF4) - forget(fp)) / H_forget = forgot(fp) - forgot(NF4); the scorecard tests the
                      high end of its 95% CI (ptq_gap_ci_high)

A point *holds* when the scorecard's forgetting, retain and PTQ-gap properties all pass (structural erasure is not
asked here).  The runs keep their metrics, scorecard and step log; their model_update.safetensors (4 B per touched
coordinate and its index) is deleted once the run is read, as nothing here reopens the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mansu.io import read_json
from mansu.models.demo import check_model_seed
from mansu.runs import layout
from mansu.scorecard import chance
from mansu.unlearn.config import MAX_SEED
from mansu.unlearn.methods import METHODS
from mansu.unlearn.methods.mansu import Mansu

log = logging.getLogger(__name__)

# the learning-rate-driven baselines: every method with an `lr` that is not MANSU or one of its ablations
FRONTIER_METHODS = tuple(m for m, cls in METHODS.items() if "lr" in cls.fields and not issubclass(cls, Mansu))
HELD = ("forgetting", "retain", "ptq_gap")  # the three properties a point must pass at once
Group = Literal["baseline", "mansu", "fisher"]
# the Fisher pair's setting: more candidates per step and no retain term, so the unbounded run damages retain
FISHER_CHANGES = {"update_fraction": 0.005, "mansu_retain_weight": 0.0}


@dataclass(frozen=True)
class FrontierConfig:
    methods: tuple[str, ...] = ("graddiff", "npo", "ga", "gu", "simnpo", "rmu")
    lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 5e-4, 1e-3)
    steps: tuple[int, ...] = (20,)
    seeds: tuple[int, ...] = (0, 1, 2)
    mansu_fractions: tuple[float, ...] = (0.002, 0.004)  # 0.002: the demo's (UnlearnConfig default)
    mansu_seeds: tuple[int, ...] = (0, 1, 2)
    mansu_steps: int | None = None  # None: MANSU's demo steps
    fisher_epsilons: tuple[float, ...] = (1e-5, 3e-6)  # () skips the pair; chosen after seeing runs (docs)
    retain_eval_limit: int = 200  # compare's: the first 200 retain questions
    model_seed: int = 0  # the demo model's training seed (mansu.models.demo), as `mansu run --demo --model-seed`

    def __post_init__(self) -> None:
        check_model_seed(self.model_seed, "--model-seed")
        bad = [m for m in self.methods if m not in FRONTIER_METHODS]
        if bad:
            raise ValueError(f"--methods: {', '.join(bad)} not lr-driven baselines; accepted are "
                             f"{', '.join(FRONTIER_METHODS)}")
        _check(self.methods, "--methods", "baselines", lambda v: True, empty=True)
        _check(self.lrs, "--lrs", "learning rates in (0, 10]", lambda v: 0 < v <= 10)
        _check(self.steps, "--steps", "step counts in [1, 1000]", lambda v: isinstance(v, int) and 1 <= v <= 1000)
        for name, seeds in (("--seeds", self.seeds), ("--mansu-seeds", self.mansu_seeds)):
            _check(seeds, name, f"seeds in [0, {MAX_SEED}]", lambda v: isinstance(v, int) and 0 <= v <= MAX_SEED,
                   empty=name == "--mansu-seeds")
        _check(self.mansu_fractions, "--mansu-fractions", "update fractions in (0, 1]", lambda v: 0 < v <= 1,
               empty=True)
        _check(self.fisher_epsilons, "--fisher-epsilons", "Fisher budgets epsilon > 0", lambda v: v > 0, empty=True)
        if self.mansu_steps is not None and not 1 <= self.mansu_steps <= 1000:
            raise ValueError(f"--mansu-steps must be in [1, 1000], got {self.mansu_steps}")
        if not 1 <= self.retain_eval_limit <= 100_000:
            raise ValueError(f"--retain-eval-limit must be in [1, 100000], got {self.retain_eval_limit}")


def _check(values: Sequence, flag: str, what: str, ok: Callable[[Any], bool], *, empty: bool = False) -> None:
    if not values and not empty:
        raise ValueError(f"{flag} names no value; give {what}")
    bad = [v for v in values if isinstance(v, bool) or not ok(v)]
    if bad:
        raise ValueError(f"{flag}: {', '.join(map(str, bad))} not accepted; give {what}")


QUICK = FrontierConfig(methods=("graddiff",), lrs=(1e-3,), steps=(2,), seeds=(0,), mansu_fractions=(0.002,),
                       mansu_seeds=(0,), mansu_steps=2, fisher_epsilons=(), retain_eval_limit=20)


@dataclass(frozen=True)
class Setting:
    """One run to make: a method, its changes over the demo settings, a seed."""
    group: Group
    method: str
    label: str  # the setting without its seed, e.g. "graddiff lr 0.0001"
    changes: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def settings(cfg: FrontierConfig) -> list[Setting]:
    """Every run of the sweep, seed-major within each group (a partial sweep already covers every setting)."""
    out = [Setting("baseline", m, _label(m, lr=lr, steps=s, multi=len(cfg.steps) > 1), {"lr": lr, "steps": s}, seed)
           for seed in cfg.seeds for m in cfg.methods for s in cfg.steps for lr in cfg.lrs]
    mansu_steps = {} if cfg.mansu_steps is None else {"steps": cfg.mansu_steps}
    steps_label = "" if cfg.mansu_steps is None else f", {cfg.mansu_steps} steps"  # step grids merge over sweeps
    out += [Setting("mansu", "mansu", f"mansu update_fraction {f:g}{steps_label}", {"update_fraction": f,
                                                                                   **mansu_steps}, seed)
            for seed in cfg.mansu_seeds for f in cfg.mansu_fractions]
    if cfg.fisher_epsilons:
        pair = {**FISHER_CHANGES, **mansu_steps}
        out += [s for seed in cfg.mansu_seeds for s in (
            Setting("fisher", "mansu_no_fisher", "unbounded (epsilon = inf)", pair, seed),
            *(Setting("fisher", "mansu", f"bounded epsilon {e:g}", {**pair, "epsilon": e}, seed)
              for e in cfg.fisher_epsilons))]
    return out


def _label(method: str, *, lr: float, steps: int, multi: bool) -> str:
    return f"{method} lr {lr:g}" + (f", {steps} steps" if multi else "")


@dataclass(frozen=True)
class FrontierPoint:
    """One finished run as the frontier reads it (module docstring: forgot, retain_lost, ptq_gap)."""
    group: Group
    method: str
    label: str
    seed: int
    changes: dict[str, Any]
    run: str  # the run folder
    forget_base: float
    forget_fp: float
    forget_nf4: float
    retain_base: float
    retain_fp: float
    retain_nf4: float
    forgot_fp: float
    forgot_nf4: float
    retain_lost_fp: float
    retain_lost_nf4: float
    ptq_gap: float
    ptq_gap_ci_high: float
    passes: dict[str, bool]
    holds: bool
    median_ratio: float | None
    params_touched: int
    fisher_cost: float | None  # MANSU: 1/2 sum F delta^2 spent (nats, second order); None for baselines
    budget_used: float | None  # fisher_cost / epsilon (0 when unbounded)
    n_dropped: int | None      # floored candidates the bound dropped in the last step
    wall_seconds: float
    n_coordinates: int | None = None  # coordinates the method may move (MANSU: its circuit's); None in old JSONs
    model_seed: int = 0  # the demo model's training seed (0 in JSONs from before the option)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_point(setting: Setting, run: Path) -> FrontierPoint:
    """The frontier's numbers of a finished run, read back from its metrics.json, scorecard.json and step log."""
    m = read_json(run / layout.METRICS)
    props = read_json(run / layout.SCORECARD)["properties"]
    acc = {(k, s): float(m[k][s]["accuracy"]) for k in ("base_fp", "unlearned_fp", "unlearned_nf4")
           for s in ("forget", "retain")}
    head_f = acc["base_fp", "forget"] - chance(m, "forget")[0]
    head_r = acc["base_fp", "retain"] - chance(m, "retain")[0]
    last = _last_step(run)
    return FrontierPoint(
        setting.group, setting.method, setting.label, setting.seed, setting.changes, str(run),
        acc["base_fp", "forget"], acc["unlearned_fp", "forget"], acc["unlearned_nf4", "forget"],
        acc["base_fp", "retain"], acc["unlearned_fp", "retain"], acc["unlearned_nf4", "retain"],
        forgot_fp=props["forgetting"]["value"],
        forgot_nf4=(acc["base_fp", "forget"] - acc["unlearned_nf4", "forget"]) / head_f,
        retain_lost_fp=props["retain"]["value"],
        retain_lost_nf4=(acc["base_fp", "retain"] - acc["unlearned_nf4", "retain"]) / head_r,
        ptq_gap=props["ptq_gap"]["value"], ptq_gap_ci_high=props["ptq_gap"]["tested"],
        passes={p: bool(props[p]["pass"]) for p in HELD}, holds=all(props[p]["pass"] for p in HELD),
        median_ratio=(m.get("survival") or {}).get("median_ratio"),
        params_touched=int(m["unlearn"]["n_params_touched"]),
        fisher_cost=last.get("fisher_cost"), budget_used=last.get("budget_used"), n_dropped=last.get("n_dropped"),
        wall_seconds=float(m["unlearn"]["wall_seconds"]), n_coordinates=m["unlearn"].get("n_coordinates"),
        model_seed=int(read_json(run / layout.CONFIG)["spec"].get("model_seed", 0)))


def _last_step(run: Path) -> dict[str, Any]:
    lines = (run / layout.STEPS).read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def specs(cfg: FrontierConfig, plan: Sequence[Setting]) -> list:
    """The RunSpec of every setting, built (and so validated) before any run starts: compare's evaluation (NF4 the
    only quantizer scored), attribution only where MANSU needs its circuit, with compare's records and IG steps
    (DEMO_ATTRIBUTION, via demo_spec): the circuit, and so MANSU's update, depends on them."""
    from mansu.spec import demo_spec

    return [demo_spec(s.method, **{**s.changes, "seed": s.seed}, model_seed=cfg.model_seed,
                      retain_eval_limit=cfg.retain_eval_limit, save_model=False, store_update=False,
                      quantizers="nf4", attribution=s.group != "baseline") for s in plan]


def frontier_sweep(cfg: FrontierConfig, root: Path, *, progress: Callable[[int, int, Setting], None] | None = None,
                   on_point: Callable[[list[FrontierPoint]], None] | None = None) -> list[FrontierPoint]:
    """Run every setting (runs under `root`) and return their points; `on_point` sees the points so far after each
    run.  Baselines share one base cache (no attribution), MANSU's runs another (the circuit is found once)."""
    from mansu.pipeline import BaseCache, run_pipeline, start_run

    plan = settings(cfg)
    run_specs = specs(cfg, plan)
    caches = {"baseline": BaseCache(), "circuit": BaseCache()}
    points = []
    for i, (setting, spec) in enumerate(zip(plan, run_specs)):
        if progress:
            progress(i, len(plan), setting)
        run = start_run(spec, root=root)
        run_pipeline(run, caches["baseline" if setting.group == "baseline" else "circuit"])
        points.append(read_point(setting, run))
        (run / layout.MODEL_UPDATE).unlink(missing_ok=True)
        if on_point:
            on_point(points)
    return points


def config_to_json(cfg: FrontierConfig) -> dict[str, Any]:
    return {**asdict(cfg), "fisher_changes": FISHER_CHANGES}


def read_points(path: Path) -> tuple[list[FrontierPoint], list[str], float]:
    """The points of an earlier sweep's JSON (the page's twin), the commands that made them and their wall time
    (s); ValueError when the file is not one."""
    data = read_json(path)
    try:
        points = [FrontierPoint(**p) for p in data["points"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a frontier sweep's JSON (no points of the expected fields: {exc})") from None
    return points, list(data.get("commands", [])), float(data.get("wall_seconds", 0.0))
