"""One typed spec from the form (or the flags) to the pipeline: `RunSpec` holds a real `UnlearnConfig` and a real
`ScorecardConfig`, every field typed and documented (mansu/options.py), validated on construction.

`model="demo"` names the embedded demo model wherever a model is asked for; with it, empty forget/retain paths
mean the demo world's splits.  A spec is saved as JSON in the run's config.json and read back by `from_dict`;
`python -m mansu run --spec FILE.json` accepts the same JSON (or a list of specs: a queue).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mansu.attribution.budget import CACHE_MB
from mansu.attribution.data import CorruptionKind
from mansu.attribution.localisation import Localisation
from mansu.attribution.neurons import MAX_FRACTION
from mansu.choices import Alignment, Device, DType, MCQFormat, NF4Mode
from mansu.data.templates import DEFAULT_TEMPLATE, FORMAT_TEMPLATES, PRESETS, check_template
from mansu.io import read_json
from mansu.models.demo import MAX_MODEL_SEED
from mansu.options import from_dict, opt, validate
from mansu.quant.alignment import DEFAULT_QUANTIZERS, parse_alignment, parse_quantizers
from mansu.scorecard import ScorecardConfig
from mansu.unlearn.config import UnlearnConfig
from mansu.unlearn.demo_settings import DEMO_ALIGNMENT, DEMO_ATTRIBUTION, demo_settings

DEMO = "demo"


@dataclass(frozen=True)
class RunSpec:
    model: str = opt(DEMO, "HF model folder or hub id, or 'demo' for the embedded demo model")
    model_seed: int = opt(0, "with model 'demo': the demo model's training seed (same world and recipe; 0 is the "
                             "demo model, others are built under $MANSU_HOME/demo-seedN when missing)",
                          lo=0, hi=MAX_MODEL_SEED)
    forget: str = opt("", "forget set (JSONL/JSON/CSV/Parquet); empty with --model demo: the demo's forget split")
    retain: str = opt("", "retain set; empty with --model demo: the demo's retain split")
    tokenizer: str | None = opt(None, "tokenizer: a folder/file, or 'fast' for the model's tokenizer.json exactly "
                                      "as saved (default: AutoTokenizer)")
    unlearn: UnlearnConfig = opt(UnlearnConfig(), "unlearning settings", flag=False)
    scorecard: ScorecardConfig = opt(ScorecardConfig(), "scorecard thresholds", flag=False)
    base_alignment: Alignment = opt("natural", "natural base, or its Linear weights snapped to a quantizer's round "
                                               "trip first: nf4-grid, <quantizer>, or <quantizer>:<fraction> for a "
                                               "seeded fraction of its blocks (SPEC.md: where the dual failure shows)")
    fmt: MCQFormat = opt("cloze", "MCQ scoring format (letter: the template 'letter'; give --template for others)")
    template: str = opt(DEFAULT_TEMPLATE, f"prompt template of MCQ and QA records, used by scoring, unlearning and "
                                          f"attribution: {', '.join(PRESETS)}, wmdp:TOPIC, or a custom string "
                                          "containing {question} (mansu/data/templates.py)")
    forget_eval: str = opt("", "forget set the scores are computed on (default: the forget training set, with a "
                               "warning that the scores are then on training data)")
    retain_eval: str = opt("", "retain set the scores are computed on (default: the retain training set, with a "
                               "warning)")
    probe: str = opt("", "records attribution and CAD probe (default: the forget training set)")
    holdout: str = opt("", "records never trained on, from the forget set's distribution and shape: the non-members "
                           "of the membership-inference signal (Min-K prob AUC, MUSE's PrivLeak; QA/text forget sets); "
                           "empty: no membership signal")
    corruption: CorruptionKind = opt("auto", "attribution's corrupted input: auto (subject when every record has "
                                             "one, else mean-ablation), subject, shuffled-subject, mean-ablation, "
                                             "zero-ablation (mansu/attribution/data.py)")
    quantizers: str = opt(DEFAULT_QUANTIZERS, "quantizers the eval stage scores (comma-separated, simulated "
                                                      "bit-exact; nf4 is the headline; gptq-int4-g128 on request: "
                                                      "llmcompressor GPTQ calibrated on the retain data)")
    nf4_mode: NF4Mode = opt("simulated", "NF4 twin: simulated (bit-exact dequantized) or real (bitsandbytes)")
    attribution: bool = opt(True, "EAP-IG circuit and CAD (off: MANSU uses every Linear weight)")
    circuit_target: float = opt(0.8, "faithfulness of the smallest faithful circuit", lo=0.0, hi=1.5, lo_open=True)
    # 1 by default: at the same number of moved weights the finer grain neither forgot more nor kept retain better
    # on the demo (docs/demo_search.md, section 5); it shrinks an 8B circuit's engine memory ~3x (mansu/memory.py)
    mlp_neuron_mass: float = opt(1.0, "neuron grain of the circuit's MLPs: each keeps its fewest top-attributed "
                                      "hidden neurons covering this fraction of its attribution (at most "
                                      f"{MAX_FRACTION:.0%} of them; mansu/attribution/neurons.py), e.g. 0.8 (the "
                                      "demo's circuit then owns 30% of the weights, not 86%); 1: the whole MLP",
                                 lo=0.0, hi=1.0, lo_open=True)
    localisation: Localisation = opt("circuit", "where MANSU's update may go: circuit (the EAP-IG circuit), or a mask "
                                                "of the circuit's size: random, fact_mlp (causal tracing's fact-lookup "
                                                "MLPs), saliency (top |forget grad| / retain Fisher); "
                                                "mansu/attribution/localisation.py")
    attribution_records: int = opt(32, "forget records attributed (EAP-IG cost grows with it)", lo=1, hi=100_000)
    ig_steps: int = opt(5, "EAP-IG integration steps (5-30 typical)", lo=1, hi=1000)
    attribution_cache_mb: int = opt(CACHE_MB, "MiB of corrupted activations the circuit search keeps on the device "
                                              "between evaluations; batches beyond it are recomputed (0: all)", lo=0)
    retain_eval_limit: int | None = opt(None, "score only the first N retain records (default all)", lo=1)
    save_model: bool = opt(False, "also save_pretrained the full unlearned model into the run folder (the run "
                                  "always saves its sparse update; `mansu export` rebuilds the model from it)")
    store_update: bool = opt(True, "write update.safetensors (the floor tuner's input)")
    device: Device = opt("cpu", "cpu, cuda, or auto (accelerate device_map)")
    dtype: DType = opt("auto", "weights' dtype (auto: bf16 on a GPU, fp32 on the CPU)")
    memory_limit_gb: float | None = opt(None, "GiB the run may use (default: the device's free memory); a run "
                                              "estimated to need more stops before loading (mansu/memory.py)", lo=0.0,
                                        lo_open=True)
    parent_run: str | None = opt(None, "the run this one re-floors (--from-run)", flag=False)

    def __post_init__(self) -> None:
        if isinstance(self.unlearn, dict):  # from JSON: nested objects become their dataclasses
            object.__setattr__(self, "unlearn", UnlearnConfig.from_dict(self.unlearn))
        if isinstance(self.scorecard, dict):
            object.__setattr__(self, "scorecard", from_dict(ScorecardConfig, self.scorecard, "scorecard"))
        if not isinstance(self.unlearn, UnlearnConfig) or not isinstance(self.scorecard, ScorecardConfig):
            raise ValueError("unlearn and scorecard must be JSON objects of their settings")
        validate(self)
        parse_alignment(self.base_alignment)
        parse_quantizers(self.quantizers, calibrated=True)
        if not self.model.strip():
            raise ValueError("model path or id is empty: give a local model folder or a hub id, or 'demo'")
        if self.model_seed and self.model != DEMO:
            raise ValueError(f"model_seed {self.model_seed} picks a demo model; give model 'demo' (--demo), or "
                             "drop the model seed")
        if self.model != DEMO and not (self.forget and self.retain):
            raise ValueError("give forget and retain data files (or model 'demo' for the demo world's splits)")
        check_template(self.template)
        if self.localisation != "circuit":
            self._check_localisation()
        if self.fmt == "letter" and self.template != DEFAULT_TEMPLATE:
            raise ValueError(f"give fmt 'letter' or template {self.template!r}, not both (fmt letter is the template "
                             "'letter')")

    def _check_localisation(self) -> None:
        from mansu.unlearn.methods import METHODS

        if not METHODS[self.method].circuit_restricted or not self.attribution:
            raise ValueError(f"localisation {self.localisation!r} replaces a circuit-restricted method's circuit: give "
                             f"a method among {', '.join(m for m, c in METHODS.items() if c.circuit_restricted)} with "
                             "attribution on, or localisation 'circuit'")

    @property
    def config(self) -> UnlearnConfig:
        return self.unlearn

    @property
    def prompt_template(self) -> str:
        """The template every stage renders prompts with (fmt letter names the template 'letter')."""
        return FORMAT_TEMPLATES[self.fmt] if self.template == DEFAULT_TEMPLATE else self.template

    @property
    def method(self) -> str:
        return self.unlearn.method

    @property
    def is_demo(self) -> bool:
        return self.model == DEMO

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return from_dict(cls, data, "run")


def specs_from_file(path: str | Path) -> list[RunSpec]:
    """The specs in a JSON file: one spec object, or a list of them (a queue)."""
    data = read_json(Path(path))
    items = data if isinstance(data, list) else [data]
    if not items:
        raise ValueError(f"{path}: an empty list; give a run spec object or a list of them")
    return [RunSpec.from_dict(item) for item in items]


def run_slug(spec: RunSpec) -> str:
    """The folder slug of a run: method, base, demo model seed (when not 0) and seed (a --from-run child adds its
    kappa)."""
    model = f"-m{spec.model_seed}" if spec.model_seed else ""  # a demo model other than seed 0
    where = "" if spec.localisation == "circuit" else f"-{spec.localisation.replace('_', '')}"  # issue 13, item 5
    slug = f"{spec.method}{where}-{spec.base_alignment}{model}-s{spec.unlearn.seed}"
    return f"{slug}-k{spec.unlearn.kappa:g}" if spec.parent_run else slug


def run_label(run_id: str, config: dict[str, Any]) -> str:
    """The one human label of a run, in pickers, legends and reports: method, base, demo model seed (when not 0),
    seed, kappa for a re-floored child, and a short id (the run's HHMMSS plus its same-second suffix) that tells
    two runs of one method apart."""
    spec = config.get("spec") if isinstance(config, dict) else None
    if not isinstance(spec, dict):  # an unreadable config: the folder name is all there is
        return run_id
    unlearn = spec.get("unlearn") if isinstance(spec.get("unlearn"), dict) else {}
    parts = [str(unlearn.get("method") or config.get("method", "?") if isinstance(config, dict) else "?"),
             str(spec.get("base_alignment", "?")), f"s{unlearn.get('seed', '?')}"]
    if spec.get("model_seed"):  # a demo model other than seed 0
        parts.insert(2, f"model {spec['model_seed']}")
    if spec.get("parent_run"):
        parts.append(f"κ{unlearn.get('kappa', '?')}")
    short = run_id.split("-")[1] if run_id.count("-") >= 2 else run_id
    suffix = run_id.split("-")[2] if run_id.count("-") >= 3 and run_id.split("-")[2].isdigit() else ""
    return " · ".join(parts) + f" · {short}{'.' + suffix if suffix else ''}"


def demo_spec(method: str, **changes: Any) -> RunSpec:
    """A run on the demo world with the demo settings of `method` (docs/results.md) and the demo's base alignment;
    `changes` may hold RunSpec fields and UnlearnConfig fields (those override the demo settings)."""
    unlearn_names = {f.name for f in dataclasses.fields(UnlearnConfig)}
    unlearn = {**demo_settings(method), "method": method, **{k: v for k, v in changes.items() if k in unlearn_names}}
    rest = {k: v for k, v in changes.items() if k not in unlearn_names}
    return RunSpec(**{"base_alignment": DEMO_ALIGNMENT, **DEMO_ATTRIBUTION, **rest, "model": DEMO,
                      "unlearn": UnlearnConfig(**unlearn)})
