"""The run pipeline: base evaluation -> circuit -> unlearning -> evaluation (fp, NF4) -> attribution after ->
CAD -> survival -> scorecard, one stage at a time, each writing its artifacts before the next starts.  The eval
stages also score every quantizer of `RunSpec.quantizers` (simulated twins, mansu.quant.twin.quantized: NF4 stays
the headline) and base evaluation records the base's grid diagnostic per quantizer (mansu.quant.diagnose).

Finished stages are listed in stages.json; `run_pipeline` on an existing run skips them (a killed run resumes
from its last finished stage).  status.json shows the stage and progress throughout.  A NaN/Inf loss marks the
run failed with the step and keeps everything written so far.  The base model on disk is never modified.

One model copy at rest: the base is loaded (and aligned: nf4-grid, any quantizer's grid or a fraction of it) once
per BaseCache; the unlearning writes into it while mansu.unlearn.params.recording saves the base value of every
touched coordinate (the restore buffer: 10 B per touched coordinate in bf16, 12 B in fp32, on each parameter's
device), and `Context.base()` writes those back bit-exactly before anything needs the base again (the next run of
a compare, a resume).  Quantized twins are the same model inside a `with` block (mansu.quant.twin).  A run saves
the unlearned model as its sparse update over the base (model_update.safetensors, mansu.unlearn.model_update;
`mansu export` rebuilds the full model); the full save_pretrained copy into <run>/model only when `save_model`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mansu.advice import advice_entry
from mansu.attribution.cad import cad
from mansu.attribution.circuit import circuit_parameter_masks, smallest_faithful_circuit
from mansu.attribution.data import Prompts, prepare_prompts, resolve_kind
from mansu.attribution.eap import attribute
from mansu.attribution.localisation import localise
from mansu.attribution.neurons import with_neuron_grain
from mansu.attribution.serialize import load_circuit, load_graph, save_circuit, save_graph
from mansu.data.records import load_records
from mansu.io import read_json, write_json_atomic
from mansu.memory import check_engine_memory, check_memory
from mansu.metrics.accuracy import context_length
from mansu.metrics.scoring import check_fit, score_records
from mansu.metrics.text import ROUGE_PER_RECORD, check_holdout, text_metrics
from mansu.models.demo import demo_assets, ensure_demo, is_complete
from mansu.models.loading import load_config, load_model, load_tokenizer, require_causal_lm, resolve_dtype, torch_dtype
from mansu.quant.alignment import parse_quantizers
from mansu.quant.diagnose import diagnose_model
from mansu.quant.gptq import calibration_texts, ensure_env, gptq_quantized
from mansu.quant.registry import CALIBRATED_QUANTIZERS, QUANTIZERS
from mansu.quant.survival import alignment_report, survival_analysis, write_survival
from mansu.quant.targets import quant_layout
from mansu.quant.twin import nf4_twin, paired_gap, quantized
from mansu.runs import layout
from mansu.runs.store import (
    RunState,
    artifact,
    create_run,
    inherit_artifacts,
    read_cad,
    read_config,
    read_metrics,
    run_dir,
    update_metrics,
    validate_run_id,
    write_cad,
    write_status,
)
from mansu.scorecard import build_scorecard, write_scorecard
from mansu.spec import DEMO, RunSpec, run_slug
from mansu.unlearn.artifacts import update_tensors, write_update
from mansu.unlearn.config import UnlearnConfig
from mansu.unlearn.data import encode_records
from mansu.unlearn.engine import NonFiniteLossError, run_unlearning
from mansu.unlearn.methods import METHODS
from mansu.unlearn.model_update import read_model_update, write_model_update
from mansu.unlearn.nf4_model import align_base
from mansu.unlearn.params import BaseRestore, put_values, quantizable_names, recording

log = logging.getLogger(__name__)

STAGES = ("base_eval", "attribution_before", "unlearn", "eval_fp", "eval_nf4", "attribution_after", "cad",
          "survival", "scorecard")


@dataclass
class BaseCache:
    """What runs on the same base share (compare): the aligned base model, its evaluations and its circuit."""
    model: Any = None
    tokenizer: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    graph: Any = None
    circuit: Any = None
    masks: dict | None = None
    circuit_status: dict | None = None
    stats: dict = field(default_factory=dict)  # engine statistics of the base weights, shared across runs
    restore: BaseRestore | None = None  # set while `model` holds a run's update: the base values it overwrote


class RunFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class RunInputs:
    """Where a spec's model and data are on this machine ('demo' resolved to the demo world)."""
    model: str
    forget: str
    retain: str
    forget_eval: str = ""   # empty: scored on the training split (a warning says so)
    retain_eval: str = ""
    probe: str = ""         # empty: attribution probes the forget training split
    holdout: str = ""       # empty: no membership-inference signal (mansu.metrics.text)

    def path(self, split: str) -> str:
        """The file of a split: forget, retain, forget_eval, retain_eval or probe (the last three default to
        their training split)."""
        if split == "holdout":
            return self.holdout
        return getattr(self, split) or (self.retain if split == "retain_eval" else self.forget)

    def eval_sets(self) -> dict[str, Any]:
        """What the scores and the circuit were computed on, with the training-data warning when it applies
        (stored as metrics.json "eval_sets")."""
        on_training = [s for s in ("forget", "retain") if not getattr(self, f"{s}_eval")]
        out = {"forget": self.path("forget_eval"), "retain": self.path("retain_eval"), "probe": self.path("probe"),
               **({"holdout": self.holdout} if self.holdout else {}),
               "on_training_data": on_training}
        if on_training:
            out["warning"] = (f"the {' and '.join(on_training)} scores are on the training data (the records the "
                              "method unlearns on); give --forget-eval / --retain-eval for held-out scores")
        return out


def resolve_model_path(name: str) -> str:
    """'demo' names the cached demo model in every command (built first when missing); anything else passes."""
    return str(ensure_demo().model_dir) if name == DEMO else name


def resolve_inputs(spec: RunSpec, *, build_demo: bool = True) -> RunInputs:
    """The spec's model and data paths; 'demo' is the cached demo model (built first when `build_demo`)."""
    evals = (spec.forget_eval, spec.retain_eval, spec.probe, spec.holdout)
    if not spec.is_demo:
        return RunInputs(spec.model, spec.forget, spec.retain, *evals)

    seed = spec.model_seed  # the demo model trained with this seed (0: the demo model)
    assets = ensure_demo(model_seed=seed) if build_demo else demo_assets(model_seed=seed)
    return RunInputs(str(assets.model_dir), spec.forget or str(assets.forget_path),
                     spec.retain or str(assets.retain_path), *evals)


def load_split(path: str) -> list:
    """The records of one data file: MCQ, QA or text, one shape per file (mansu.data.records)."""
    return load_records(path)


def _check_data(spec: RunSpec, inputs: RunInputs, tokenizer: Any, limit: int | None) -> None:
    """Every data file of the run parses, renders under the template and fits the context; the corruption kind
    suits the probe records (subject needs subjects)."""
    splits = ("forget", "retain", "forget_eval", "retain_eval", "probe", "holdout")
    for path in dict.fromkeys(inputs.path(s) for s in splits if inputs.path(s)):
        check_fit(tokenizer, limit, load_split(path), template=spec.prompt_template, source=path)
    if inputs.holdout:
        check_holdout(load_split(inputs.path("forget_eval")), load_split(inputs.holdout), inputs.holdout)
    if spec.attribution:
        resolve_kind(spec.corruption, load_split(inputs.path("probe")))


def check_inputs(spec: RunSpec, *, build_demo: bool = True) -> RunInputs | None:
    """Check everything a run needs before its folder exists: the model folder is readable and a causal LM, every
    data file parses and validates (the settings were validated when the spec was built).  Raises ValueError /
    FileNotFoundError with one line and creates nothing.  A demo spec builds the demo first when `build_demo`;
    without it (the app, which must not train in a rerun) an unbuilt demo is left to the backend (None)."""
    if spec.is_demo and not build_demo and not is_complete(demo_assets(model_seed=spec.model_seed)):
        return None
    inputs = resolve_inputs(spec, build_demo=build_demo)
    config = load_config(inputs.model)
    require_causal_lm(config, inputs.model)
    try:
        tokenizer = load_tokenizer(inputs.model, spec.tokenizer)
    except OSError as exc:
        raise ValueError(f"{inputs.model}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    _check_data(spec, inputs, tokenizer, context_length(config))
    check_memory(spec, config, torch_dtype(spec.dtype, spec.device))
    if build_demo and set(parse_quantizers(spec.quantizers, calibrated=True)) & set(CALIBRATED_QUANTIZERS):
        ensure_env()  # GPTQ's side environment, created now (or one line why not) rather than mid-run
    return inputs


def preflight(spec: RunSpec) -> RunInputs:
    """`check_inputs`, building the demo when the spec names it (the backend's check before creating a run); logs
    the training-data warning when the spec has no evaluation sets of its own."""
    inputs = check_inputs(spec, build_demo=True)
    if inputs.eval_sets().get("warning"):
        log.warning("%s", inputs.eval_sets()["warning"])
    return inputs


@dataclass
class Context:
    run: Path
    spec: RunSpec
    cache: BaseCache
    unlearned: Any = None
    records: dict[str, list] = field(default_factory=dict)
    _inputs: RunInputs | None = None
    _prompts: Prompts | None = None

    @property
    def inputs(self) -> RunInputs:
        if self._inputs is None:
            self._inputs = resolve_inputs(self.spec)
        return self._inputs

    @property
    def config(self):
        return self.spec.config

    def base(self):
        """The (aligned) base model and tokenizer, loaded once; a run's update it holds is reverted first."""
        if self.cache.model is None:
            lm = load_model(self.inputs.model, dtype=self.spec.dtype, device=self.spec.device,
                            tokenizer=self.spec.tokenizer)
            align_base(lm.model, self.spec.base_alignment, self.config.blocksize)
            self.cache.model, self.cache.tokenizer = lm.model, lm.tokenizer
        if self.cache.restore is not None:
            self.cache.restore.revert(self.cache.model)
            self.cache.restore = None
            if self.unlearned is self.cache.model:
                self.unlearned = None
        return self.cache.model, self.cache.tokenizer

    def tokenizer(self):
        """The base's tokenizer (loading the base when needed, without reverting an update it holds)."""
        if self.cache.tokenizer is None:
            self.base()
        return self.cache.tokenizer

    def split(self, name: str) -> list:
        """Records of forget, retain (training), forget_eval, retain_eval (scored) or probe (attributed)."""
        if name not in self.records:
            self.records[name] = load_split(self.inputs.path(name))
        return self.records[name]

    def batch(self, name: str):
        """A training split as a token batch under the run's template (mansu.unlearn.data)."""
        return encode_records(self.cache.tokenizer, self.split(name), self.spec.prompt_template)

    def attribution_records(self) -> list:
        """Probe records spread evenly over the split (files group questions by entity; counterfactual
        corruption needs several entities)."""
        recs = self.split("probe")
        n = self.spec.attribution_records
        return recs[:: max(1, len(recs) // n)][:n]

    def prompts(self) -> Prompts:
        """The attribution records as prompts under the run's template and corruption kind, built once."""
        if self._prompts is None:
            self._prompts = prepare_prompts(self.cache.tokenizer, self.attribution_records(),
                                            template=self.spec.prompt_template, kind=self.spec.corruption)
        return self._prompts

    def eval_forget(self) -> list:
        return self.split("forget_eval")

    def eval_retain(self) -> list:
        recs = self.split("retain_eval")
        return recs[: self.spec.retain_eval_limit] if self.spec.retain_eval_limit else recs

    def model_after(self):
        """The unlearned model: the cached base holding this run's update (put back from model_update.safetensors
        when another process unlearned it, e.g. on resume); runs made before sparse updates load <run>/model."""
        if self.unlearned is None:
            legacy = self.run / layout.MODEL_DIR
            if not (self.run / layout.MODEL_UPDATE).is_file() and (legacy / "config.json").is_file():
                self.unlearned = load_model(legacy, dtype=self.spec.dtype, device=self.spec.device).model
                return self.unlearned
            values, _ = read_model_update(self.run / layout.MODEL_UPDATE)
            model, _ = self.base()
            self.cache.restore = BaseRestore()
            with recording(model, self.cache.restore):
                put_values(model, values)
            self.unlearned = model
        return self.unlearned


# ---------------------------------------------------------------- stages

def _evaluate(ctx: Context, model) -> dict[str, Any]:
    tok = ctx.tokenizer()
    out = {}
    for split, recs in (("forget", ctx.eval_forget()), ("retain", ctx.eval_retain())):
        scores = score_records(model, tok, recs, template=ctx.spec.prompt_template, batch_size=256, n_boot=1000)
        holdout = ctx.split("holdout") if split == "forget" and ctx.inputs.holdout else None
        out[split] = {**scores, **text_metrics(model, tok, recs, loss=scores.get("loss"), holdout=holdout,
                                               template=ctx.spec.prompt_template)}  # QA/text only (MUSE, TOFU)
    return out


def _twin(ctx: Context, model):
    """The headline NF4 twin of `model`: the model itself inside the `with` block (mansu.quant.twin)."""
    return nf4_twin(model, ctx.spec.nf4_mode, blocksize=ctx.config.blocksize)


def _quant_evals(ctx: Context, model, nf4: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{quantizer: evaluation} of the spec's quantizers, each a simulated bit-exact twin (the model rounded in place
    and restored); nf4 reuses the headline evaluation `nf4` when that one is simulated too."""
    out = {}
    for q in parse_quantizers(ctx.spec.quantizers, calibrated=True):
        if q == "nf4" and ctx.spec.nf4_mode == "simulated":
            out[q] = {**nf4, "skipped_modules": []}
            continue
        with _quant_twin(ctx, model, q) as twin:
            out[q] = {**_evaluate(ctx, twin.model), "skipped_modules": twin.skipped_modules}
    return out


def _quant_twin(ctx: Context, model, q: str):
    """`model` under quantizer q inside a `with` block: a grid's simulated round trip, or GPTQ (mansu.quant.gptq)
    calibrated on the retain data."""
    if q in CALIBRATED_QUANTIZERS:
        return gptq_quantized(model, ctx.tokenizer(), calibration_texts(ctx.split("retain")))
    return quantized(model, q, blocksize=ctx.config.blocksize)


def _quant_mode(q: str) -> str:
    return "calibrated" if q in CALIBRATED_QUANTIZERS else "simulated"


def _gaps(fp: dict[str, Any], quant: dict[str, Any], mode: str) -> dict[str, Any]:
    """PTQ gap per split, acc(quantized) - acc(fp), paired bootstrap CI (mansu.quant.twin.paired_gap)."""
    gaps = {split: paired_gap(fp[split]["correct"], quant[split]["correct"]).to_dict()
            for split in ("forget", "retain")}
    for split, gap in gaps.items():  # QA/text: the gap of the ROUGE-L recall too, the scorecard's metric there
        if ROUGE_PER_RECORD in fp[split] and ROUGE_PER_RECORD in quant[split]:
            gap["rouge_l"] = paired_gap(fp[split][ROUGE_PER_RECORD], quant[split][ROUGE_PER_RECORD]).to_dict()
    return {**gaps, "mode": mode}


def stage_base_eval(ctx: Context) -> None:
    if not ctx.cache.metrics:

        model, _ = ctx.base()
        ctx.cache.metrics = {"base_fp": _evaluate(ctx, model)}
        with _twin(ctx, model) as twin:
            ctx.cache.metrics["base_nf4"] = _evaluate(ctx, twin.model)
        ctx.cache.metrics["base_quant"] = _quant_evals(ctx, model, ctx.cache.metrics["base_nf4"])
        grids = [q for q in parse_quantizers(ctx.spec.quantizers, calibrated=True) if q in QUANTIZERS]
        ctx.cache.metrics["base_grid"] = diagnose_model(model, grids)  # calibrated quantizers have no grid
        names = quantizable_names(model)
        state = BaseRestore().base_view(model, names)  # each weight read on its device, one at a time
        report = alignment_report(state, names, blocksize=ctx.config.blocksize,
                                  layout=quant_layout(model))
        ctx.cache.metrics["base_alignment"] = {"setting": ctx.spec.base_alignment, **report["overall"]}
    for key, value in ctx.cache.metrics.items():
        update_metrics(ctx.run, key, value)
    update_metrics(ctx.run, "eval_sets", ctx.inputs.eval_sets())


def stage_attribution_before(ctx: Context) -> None:
    if ctx.cache.circuit_status is None:
        ctx.cache.circuit_status = _attribute_before(ctx)
    status = ctx.cache.circuit_status
    update_metrics(ctx.run, "attribution", status)
    if status.get("status") != "ok":
        write_json_atomic(ctx.run / layout.CIRCUIT, status, add_stamp=True)
        return

    model, _ = ctx.base()
    save_graph(ctx.cache.graph, ctx.run, "before", model=model, circuit=ctx.cache.circuit)
    save_circuit(ctx.cache.circuit, model, ctx.run)


def _attribute_before(ctx: Context) -> dict[str, Any]:
    if not ctx.spec.attribution:
        return {"status": "not available", "reason": "attribution turned off for this run"}
    model, tok = ctx.base()
    prompts = ctx.prompts()
    setting = {"corruption": prompts.kind, "metric": prompts.metric, "template": ctx.spec.prompt_template}
    try:
        graph = _attribute_graph(ctx, model, tok)
        circuit = smallest_faithful_circuit(model, tok, prompts.prompts, graph, target=ctx.spec.circuit_target,
                                             cache_mb=ctx.spec.attribution_cache_mb)
    except ValueError as exc:  # e.g. no counterfactual partner: said in one line, recorded for the scorecard
        log.warning("no circuit found (corruption %s): %s", prompts.kind, exc)
        return {"status": "not available", "reason": f"no circuit found with corruption {prompts.kind}: {exc}",
                **setting}
    circuit = with_neuron_grain(model, tok, prompts.prompts, circuit, mass=ctx.spec.mlp_neuron_mass,
                                metric=prompts.metric, corruption=prompts.corruption, ig_steps=ctx.spec.ig_steps)
    ctx.cache.graph, ctx.cache.circuit = graph, circuit
    ctx.cache.masks = circuit_parameter_masks(model, circuit)
    return {"status": "ok", **setting, "neuron_grain": circuit.metadata["neuron_grain"]}


def _attribute_graph(ctx: Context, model, tok):
    """EAP-IG graph of `model` on the run's attribution prompts (its corruption kind and metric)."""
    prompts = ctx.prompts()
    return attribute(model, tok, prompts.prompts, corruption=prompts.corruption, metric=prompts.metric,
                     ig_steps=ctx.spec.ig_steps, per_example=True, max_records=None)


def _no_circuit_reason(ctx: Context) -> str:
    """Why the run has no circuit, as stage attribution_before recorded it."""
    status = read_metrics(ctx.run).get("attribution") or {}
    return status.get("reason") or "no circuit (attribution off or unavailable)"


def stage_unlearn(ctx: Context) -> None:
    model, tok = ctx.base()
    steps_path = ctx.run / layout.STEPS
    steps_path.write_text("")
    cfg = ctx.config

    def on_step(record: dict) -> None:
        with steps_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        write_status(ctx.run, "unlearn", record["step"] + 1, cfg.steps)

    masks = ctx.cache.masks if ctx.cache.masks is not None else _saved_masks(ctx.run)
    masks = _localised(ctx, model, masks)
    if masks is None and METHODS[cfg.method].circuit_restricted:  # said, and recorded below: never silent
        log.warning("%s updates every quantizable weight, not a circuit: %s", cfg.method, _no_circuit_reason(ctx))
    if masks is not None and METHODS[cfg.method].circuit_restricted:  # the circuit's size is known only now
        quant = set(quantizable_names(model))
        check_engine_memory(cfg, sum(int(m.sum()) for n, m in masks.items() if n in quant),
                            ctx.spec.memory_limit_gb, ctx.spec.device)
    restore = ctx.cache.restore = BaseRestore()  # set first: a failed run is reverted by the next base()
    t0 = time.perf_counter()
    with recording(model, restore):  # the unlearning writes into the base itself
        result = run_unlearning(model, ctx.batch("forget"),
                                ctx.batch("retain"), cfg, masks=masks, on_step=on_step,
                                cache=_engine_stats(ctx))
    seconds = time.perf_counter() - t0
    ctx.unlearned = model
    write_model_update(ctx.run / layout.MODEL_UPDATE, model, restore,
                       {"base_model": ctx.spec.model, "base_alignment": ctx.spec.base_alignment,
                        "blocksize": str(cfg.blocksize), "dtype": resolve_dtype(ctx.spec.dtype, ctx.spec.device),
                        "method": cfg.method})
    if ctx.spec.store_update:
        _write_update(ctx, model, restore, result)
    if ctx.spec.save_model:
        save_model(model, tok, ctx.run / layout.MODEL_DIR)
    update_metrics(ctx.run, "unlearn", {**result.summary, "wall_seconds": round(seconds, 3),
                                        "circuit_restricted": masks is not None and
                                        METHODS[cfg.method].circuit_restricted,
                                        **({} if masks is not None else {"no_circuit": _no_circuit_reason(ctx)})})


def _localised(ctx: Context, model, masks: dict | None) -> dict | None:
    """The masks the run's `localisation` names: the circuit's, or a mask of as many coordinates
    (mansu.attribution.localisation), recorded as metrics.json "localisation"."""
    if masks is None or not METHODS[ctx.config.method].circuit_restricted:
        return masks
    if ctx.spec.localisation == "circuit":  # no prompts, batches or gradients: the normal run stays as it was
        out = localise("circuit", model, masks)
        update_metrics(ctx.run, "localisation", out.info)
        return out.masks
    cfg, prompts = ctx.config, ctx.prompts()
    out = localise(ctx.spec.localisation, model, masks, tokenizer=ctx.tokenizer(), prompts=prompts.prompts,
                   metric=prompts.metric, corruption=prompts.corruption, forget=ctx.batch("forget"),
                   retain=ctx.batch("retain"), seed=cfg.seed, n_fisher=cfg.n_fisher, damping=cfg.fisher_damping)
    update_metrics(ctx.run, "localisation", out.info)
    return out.masks


def _engine_stats(ctx: Context) -> dict:
    """The engine's shared base statistics: keyed by the coordinates' names and count, so each localisation keeps
    its own (a random and a saliency mask name the same weights with the same count)."""
    where = ctx.spec.localisation
    return ctx.cache.stats if where == "circuit" else ctx.cache.stats.setdefault(("localisation", where), {})


def _saved_masks(run: Path):
    """The circuit's parameter masks from circuit.json (a --from-run child's: its parent's), None without one."""
    if not _circuit_ok_at(run):
        return None
    return load_circuit(run)[1] or None


def _write_update(ctx: Context, model, restore: BaseRestore, result) -> None:
    """update.safetensors; its floor geometry is the base's, read back from the restore buffer tensor by tensor."""
    cfg = ctx.config
    params = restore.base_view(model, result.index.names)
    tensors, meta = update_tensors(params, result, cfg.epsilon, cfg.kappa, cfg.blocksize, result.fisher,
                                   layout=quant_layout(model), quantizers=cfg.floor_quantizers)
    write_update(ctx.run / layout.UPDATE, tensors, {**meta, "method": cfg.method})


def save_model(model, tokenizer, target: Path) -> None:
    """save_pretrained into `target` via a temp folder + rename (never a half-written model)."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stage_eval_fp(ctx: Context) -> None:
    update_metrics(ctx.run, "unlearned_fp", _evaluate(ctx, ctx.model_after()))


def stage_eval_nf4(ctx: Context) -> None:
    with _twin(ctx, ctx.model_after()) as twin:
        nf4 = _evaluate(ctx, twin.model)
    update_metrics(ctx.run, "unlearned_nf4", nf4)
    fp = read_json(ctx.run / layout.METRICS)["unlearned_fp"]
    update_metrics(ctx.run, "ptq_gap", _gaps(fp, nf4, ctx.spec.nf4_mode))
    quant = _quant_evals(ctx, ctx.model_after(), nf4)  # every quantizer of the spec; nf4 above stays the headline
    update_metrics(ctx.run, "unlearned_quant", quant)
    update_metrics(ctx.run, "ptq_gap_by_quantizer", {q: {**_gaps(fp, ev, _quant_mode(q)),
                                                         "skipped_modules": ev["skipped_modules"]}
                                                     for q, ev in quant.items()})


def _circuit_ok(ctx: Context) -> bool:
    return _circuit_ok_at(ctx.run)


def _circuit_ok_at(run: Path) -> bool:
    try:
        return read_json(artifact(run, layout.CIRCUIT)).get("status", "ok") == "ok"
    except FileNotFoundError:
        return False


def stage_attribution_after(ctx: Context) -> None:
    if not _circuit_ok(ctx):
        return

    tok = ctx.tokenizer()
    circuit, _ = load_circuit(ctx.run)
    after = ctx.model_after()
    for stage in ("after_fp", "after_nf4"):
        with _twin(ctx, after) if stage == "after_nf4" else contextlib.nullcontext() as twin:
            model = twin.model if twin is not None else after
            graph = _attribute_graph(ctx, model, tok)
            save_graph(graph, ctx.run, stage, model=model, circuit=circuit)


def stage_cad(ctx: Context) -> None:
    if not _circuit_ok(ctx):
        write_cad(ctx.run, {"status": "not available", "reason": _no_circuit_reason(ctx)})
        return
    circuit, _ = load_circuit(ctx.run)
    before = load_graph(ctx.run, "before")
    out = {"status": "ok"}
    for stage in ("after_fp", "after_nf4"):
        out[stage] = cad(before, load_graph(ctx.run, stage), circuit).to_dict()
    write_cad(ctx.run, out)


def stage_survival(ctx: Context) -> None:
    after = ctx.model_after()
    names = quantizable_names(after)
    if after is ctx.cache.model:  # the base holds this run's update: its base values are in the restore buffer
        theta = (ctx.cache.restore or BaseRestore()).base_view(after, names)
    else:  # a run saved before sparse updates: the unlearned model was loaded apart
        theta = BaseRestore().base_view(ctx.base()[0], names)
    theta_new = BaseRestore().base_view(after, names)  # nothing saved: the current weights, one at a time
    report = survival_analysis(theta, theta_new, names, blocksize=ctx.config.blocksize, seed=ctx.config.seed,
                               layout=quant_layout(after))
    write_survival(ctx.run / layout.SURVIVAL, report)
    update_metrics(ctx.run, "survival", {k: report["overall"].get(k) for k in
                                         ("n_updated", "median_ratio", "frac_code_changed", "kept_fraction", "snr")})


def stage_scorecard(ctx: Context) -> None:
    card = build_scorecard(read_metrics(ctx.run), read_cad(ctx.run), ctx.spec.scorecard)
    write_scorecard(ctx.run, card)
    update_metrics(ctx.run, "advice", advice_entry(card, ctx.config.to_dict()))  # mansu.advice: the next step to try


STAGE_FUNCS: dict[str, Callable[[Context], None]] = {
    "base_eval": stage_base_eval, "attribution_before": stage_attribution_before, "unlearn": stage_unlearn,
    "eval_fp": stage_eval_fp, "eval_nf4": stage_eval_nf4, "attribution_after": stage_attribution_after,
    "cad": stage_cad, "survival": stage_survival, "scorecard": stage_scorecard,
}


# ---------------------------------------------------------------- driver

def finished_stages(run: Path) -> list[str]:
    path = Path(run) / layout.STAGES
    return list(read_json(path).get("finished", [])) if path.is_file() else []


def mark_finished(run: Path, stage: str, seconds: float) -> None:
    path = Path(run) / layout.STAGES
    data = read_json(path) if path.is_file() else {"finished": [], "seconds": {}}
    if stage not in data["finished"]:
        data["finished"].append(stage)
    data.setdefault("seconds", {})[stage] = round(seconds, 3)
    write_json_atomic(path, data, add_stamp=True)


def _resume_point(ctx: Context, done: list[str]) -> list[str]:
    """Stages after `unlearn` need the unlearned model: without a saved model, resume re-runs unlearn."""
    saved = (ctx.run / layout.MODEL_UPDATE).is_file() or (ctx.run / layout.MODEL_DIR / "config.json").is_file()
    if "unlearn" in done and ctx.unlearned is None and not saved:
        return done[: done.index("unlearn")]
    return done


def run_pipeline(run: Path, cache: BaseCache | None = None, *, stop_after: str | None = None) -> dict[str, Any]:
    """Run (or resume) every unfinished stage of the run at `run`; returns the scorecard (or {} if stopped early).

    Raises RunFailed (status.json marked failed, with the stage/step) on a non-finite loss or any stage error.
    """
    run = Path(run)
    spec = RunSpec.from_dict(read_config(run)["spec"])
    ctx = Context(run, spec, cache or BaseCache())
    done = _resume_point(ctx, finished_stages(run))
    for i, stage in enumerate(STAGES):
        if stage in done:
            continue
        write_status(run, stage, i, len(STAGES))
        t0 = time.perf_counter()
        try:
            STAGE_FUNCS[stage](ctx)
        except NonFiniteLossError as exc:
            write_status(run, stage, exc.step, spec.config.steps, state="failed", error=str(exc), failed_step=exc.step)
            raise RunFailed(str(exc)) from exc
        except Exception as exc:
            write_status(run, stage, i, len(STAGES), state="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        mark_finished(run, stage, time.perf_counter() - t0)
        log.info("stage %s finished in %.1f s", stage, time.perf_counter() - t0)
        if stop_after == stage:
            _release_base(ctx)
            return {}
    _release_base(ctx)
    write_status(run, "done", len(STAGES), len(STAGES), state="finished")
    return read_json(run / layout.SCORECARD)


def _release_base(ctx: Context) -> None:
    """Put the cached base back at rest (the run's update reverted, bit-exactly) for the next run sharing it."""
    if ctx.cache.restore is not None:
        ctx.base()


def start_run(spec: RunSpec, *, slug: str | None = None, root: Path | None = None,
              state: RunState = "running", queue: tuple[int, int] | None = None) -> Path:
    """Create the run folder (config.json holds the validated spec, and its place in a queue) without running it."""
    config = {"kind": "unlearn", "spec": spec.to_dict(), "method": spec.method,
              **({"queue": {"index": queue[0], "of": queue[1]}} if queue else {})}
    run = create_run(config, slug or run_slug(spec), root, state=state)
    if spec.parent_run:
        inherit_parent_stages(run_dir(spec.parent_run, root), run)
    return run


def child_spec(parent_run: str, root: Path | None = None, **unlearn_changes: Any) -> RunSpec:
    """A re-floored child of a run (the floor tuner's "apply", `run --from-run`): the parent's spec with changed
    unlearning settings; it reuses the parent's base evaluation and circuit."""
    parent = RunSpec.from_dict(read_config(run_dir(validate_run_id(parent_run), root))["spec"])
    unlearn = UnlearnConfig.from_dict({**parent.unlearn.to_dict(), **unlearn_changes})
    return parent.replace(unlearn=unlearn, parent_run=parent_run)


def start_queue(specs: list[RunSpec], *, root: Path | None = None) -> list[Path]:
    """Create every run of a queue up front, marked "queued", so that `mansu runs` and the app show the whole queue
    (and a cancel of this process ends it) before the first run starts."""
    return [start_run(spec, root=root, state="queued", queue=(i, len(specs))) for i, spec in enumerate(specs)]


def inherit_parent_stages(parent: Path, run: Path) -> None:
    """--from-run: reuse the parent's base evaluation (metrics entries) and circuit (the child's inherited.json points
    at the parent's circuit and "before" graph: nothing is copied; mansu.runs.store.artifact resolves them)."""
    metrics = read_json(parent / layout.METRICS)
    for key in ("base_fp", "base_nf4", "base_quant", "base_grid", "base_alignment", "eval_sets", "attribution"):
        if key in metrics:
            update_metrics(run, key, metrics[key])
    mark_finished(run, "base_eval", 0.0)
    names = [layout.CIRCUIT, layout.CIRCUIT_MASKS] + [
        path.relative_to(parent).as_posix() for path in (layout.attribution_json(parent, "before"),
                                                         layout.attribution_tensors(parent, "before"),
                                                         layout.attribution_tracer_json(parent, "before"))]
    inherit_artifacts(parent, run, names)
    if artifact(parent, layout.CIRCUIT).is_file() or not (parent / layout.ATTRIBUTION_DIR).exists():
        mark_finished(run, "attribution_before", 0.0)
