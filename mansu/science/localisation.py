"""Localisation at a fixed budget (issue 13, item 5), on the demo world: the same MANSU update restricted to each
mask of mansu.attribution.localisation (circuit, random, fact_mlp, saliency), all of the EAP-IG circuit's size.

Every point is one normal run of the pipeline (`mansu.pipeline.run_pipeline`, as `compare` runs them) on the
NF4-grid-aligned demo base: MANSU with its demo settings and the neuron-grain circuit (mlp_neuron_mass, default 0.8:
the circuit then owns ~30% of the quantizable weights, leaving room for the other masks), only `localisation`
differing.  Seed s runs on the demo model trained with seed s and unlearns with seed s (compare's "paired" seeds).
Runs of one model share a BaseCache (the base, its evaluations and its circuit, found once), so CAD is measured
over the same circuit for every mask.

A point's numbers are the scorecard's (mansu.scorecard: relative to chance c and the base's headroom H) plus the
probe damage, scored here on the demo's held-out probe split (facts no unlearning run optimises for):

    probe_lost = (probe(base) - probe(unlearned, fp)) / H_probe

The runs' model_update.safetensors (4 B per touched coordinate and its index) is deleted once the probe is scored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mansu.attribution.localisation import LOCALISATIONS
from mansu.io import read_json
from mansu.runs import layout
from mansu.scorecard import PROPERTIES
from mansu.unlearn.config import MAX_SEED

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalisationConfig:
    localisations: tuple[str, ...] = LOCALISATIONS
    seeds: tuple[int, ...] = (0, 1, 2)       # demo model seed s unlearned with seed s
    mlp_neuron_mass: float = 0.8              # the neuron grain: a ~30% circuit (docs/demo_search.md, section 5)
    retain_eval_limit: int = 200              # compare's
    attribution_records: int | None = None    # None: the demo's (mansu.spec.demo_spec)
    ig_steps: int | None = None
    update_fraction: float | None = None      # None: MANSU's demo setting (UnlearnConfig's default)

    def __post_init__(self) -> None:
        bad = [x for x in self.localisations if x not in LOCALISATIONS]
        if bad or not self.localisations:
            raise ValueError(f"--localisations {','.join(bad) or '(none)'}: give some of {', '.join(LOCALISATIONS)}")
        if not self.seeds or any(isinstance(s, bool) or not 0 <= s <= MAX_SEED for s in self.seeds):
            raise ValueError(f"--seeds {self.seeds}: give seeds in [0, {MAX_SEED}]")
        if not 0 < self.mlp_neuron_mass <= 1:
            raise ValueError(f"--mlp-neuron-mass must be in (0, 1], got {self.mlp_neuron_mass}")
        if self.update_fraction is not None and not 0 < self.update_fraction <= 1:
            raise ValueError(f"--update-fraction must be in (0, 1], got {self.update_fraction}")
        if not 1 <= self.retain_eval_limit <= 100_000:
            raise ValueError(f"--retain-eval-limit must be in [1, 100000], got {self.retain_eval_limit}")

    def spec(self, localisation: str, seed: int):
        """The RunSpec of one point (validated when built)."""
        from mansu.spec import demo_spec

        extra = {k: v for k, v in (("attribution_records", self.attribution_records),
                                   ("ig_steps", self.ig_steps), ("update_fraction", self.update_fraction))
                 if v is not None}
        return demo_spec("mansu", seed=seed, model_seed=seed, localisation=localisation,
                         mlp_neuron_mass=self.mlp_neuron_mass, retain_eval_limit=self.retain_eval_limit,
                         save_model=False, store_update=False, quantizers="nf4", **extra)


QUICK = LocalisationConfig(seeds=(0,), retain_eval_limit=20, attribution_records=4)


@dataclass(frozen=True)
class LocalisationPoint:
    """One finished run as the localisation table reads it (module docstring)."""
    localisation: str
    seed: int
    run: str
    mask_coordinates: int       # quantizable coordinates the mask holds (the circuit's for every row of a seed)
    touched: int                # coordinates the run moved (metrics.json unlearn.n_params_touched)
    layers: list[int] | None    # fact_mlp: the MLP layers used, first the top-traced
    trace: dict | None          # fact_mlp: the causal-tracing effects
    forget_base: float
    forget_fp: float
    forget_nf4: float
    retain_base: float
    retain_fp: float
    probe_base: float
    probe_fp: float
    forgot: float               # the scorecard's forgetting (relative)
    retain_lost: float
    probe_lost: float
    ptq_gap: float              # relative; CI below
    ptq_gap_ci: tuple[float | None, float | None]
    cad: float | None
    cad_ci: tuple[float | None, float | None]
    passes: dict[str, bool | None]  # per scorecard property (None: not scored)
    wall_seconds: float
    update_fraction: float | None = None  # MANSU's; None in JSONs written before it was recorded (see the run)
    proposed: int | None = None  # coordinates MANSU selected over its steps (sum of the step log's n_candidates)
    steps: int | None = None     # MANSU's steps (None in older JSONs: see the run)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_point(localisation: str, seed: int, run: Path, probe: tuple[float, float], chance: float) -> LocalisationPoint:
    """The numbers of a finished run from its metrics.json and scorecard.json; `probe` = (base, unlearned)."""
    m = read_json(run / layout.METRICS)
    props = read_json(run / layout.SCORECARD)["properties"]
    acc = {(k, s): float(m[k][s]["accuracy"]) for k in ("base_fp", "unlearned_fp", "unlearned_nf4")
           for s in ("forget", "retain")}
    where, gap, erasure = m.get("localisation") or {}, props["ptq_gap"], props["structural_erasure"]
    return LocalisationPoint(
        localisation, seed, str(run), int(where.get("n_coordinates", m["unlearn"]["n_coordinates"])),
        int(m["unlearn"]["n_params_touched"]), where.get("layers"), where.get("trace"),
        acc["base_fp", "forget"], acc["unlearned_fp", "forget"], acc["unlearned_nf4", "forget"],
        acc["base_fp", "retain"], acc["unlearned_fp", "retain"], probe[0], probe[1],
        forgot=props["forgetting"]["value"], retain_lost=props["retain"]["value"],
        probe_lost=(probe[0] - probe[1]) / (probe[0] - chance),
        ptq_gap=gap["value"], ptq_gap_ci=(gap.get("ci_low"), gap.get("ci_high")),
        cad=erasure.get("value"), cad_ci=(erasure.get("ci_low"), erasure.get("ci_high")),
        passes={p: props[p].get("pass") if props[p].get("status") in ("pass", "fail") else None for p in PROPERTIES},
        wall_seconds=float(m["unlearn"]["wall_seconds"]),
        update_fraction=read_json(run / layout.CONFIG)["spec"]["unlearn"]["update_fraction"],
        proposed=proposed(run), steps=read_json(run / layout.CONFIG)["spec"]["unlearn"]["steps"])


def proposed(run: Path) -> int | None:
    """Coordinates MANSU selected over its steps: the sum of n_candidates in the step log (None without one)."""
    path = Path(run) / layout.STEPS
    if not path.is_file():
        return None
    return sum(int(json.loads(line).get("n_candidates", 0)) for line in path.read_text().splitlines() if line)


def probe_accuracy(cache, run: Path | None, spec) -> tuple[float, float]:
    """(accuracy, chance) on the demo's probe split of the cached base, or of the base holding `run`'s update
    (reverted after, bit-exactly)."""
    from mansu.metrics.scoring import score_records
    from mansu.models.demo import demo_assets
    from mansu.pipeline import load_split
    from mansu.unlearn.model_update import read_model_update
    from mansu.unlearn.params import BaseRestore, put_values, recording

    records = load_split(str(demo_assets(model_seed=spec.model_seed).probe_path))
    model = cache.model
    restore = BaseRestore()
    if run is not None:
        with recording(model, restore):
            put_values(model, read_model_update(run / layout.MODEL_UPDATE)[0])
    try:
        scores = score_records(model, cache.tokenizer, records, template=spec.prompt_template, batch_size=256,
                               n_boot=200)
    finally:
        restore.revert(model)
    return float(scores["accuracy"]), float(scores.get("chance", 0.25))


def localisation_sweep(cfg: LocalisationConfig, root: Path, *,
                       progress: Callable[[int, int, str, int], None] | None = None,
                       on_point: Callable[[list[LocalisationPoint]], None] | None = None) -> list[LocalisationPoint]:
    """Run every (seed, localisation) point (runs under `root`), seed-major, and return the points."""
    from mansu.pipeline import BaseCache, run_pipeline, start_run

    plan = [(seed, where) for seed in cfg.seeds for where in cfg.localisations]
    specs = [cfg.spec(where, seed) for seed, where in plan]  # every spec validated before the first run
    caches: dict[int, BaseCache] = {}
    base_probe: dict[int, tuple[float, float]] = {}
    points: list[LocalisationPoint] = []
    for i, ((seed, where), spec) in enumerate(zip(plan, specs)):
        if progress:
            progress(i, len(plan), where, seed)
        cache = caches.setdefault(seed, BaseCache())
        run = start_run(spec, root=root)
        run_pipeline(run, cache)
        if seed not in base_probe:
            base_probe[seed] = probe_accuracy(cache, None, spec)
        after, _ = probe_accuracy(cache, run, spec)
        points.append(read_point(where, seed, run, (base_probe[seed][0], after), base_probe[seed][1]))
        (run / layout.MODEL_UPDATE).unlink(missing_ok=True)
        if on_point:
            on_point(points)
    return points


def read_points(path: Path) -> tuple[list[LocalisationPoint], list[str], float]:
    """The points of an earlier sweep's JSON, its commands and wall time (s); ValueError when not one."""
    data = read_json(path)
    try:
        points = [LocalisationPoint(**{**p, "ptq_gap_ci": tuple(p["ptq_gap_ci"]), "cad_ci": tuple(p["cad_ci"])})
                  for p in data["points"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a localisation sweep's JSON (no points of the expected fields: {exc})") from None
    return points, list(data.get("commands", [])), float(data.get("wall_seconds", 0.0))


def by_seed(points: Sequence[LocalisationPoint]) -> dict[int, list[LocalisationPoint]]:
    out: dict[int, list[LocalisationPoint]] = {}
    for p in points:
        out.setdefault(p.seed, []).append(p)
    return out
