"""The run-folder layout: every file name a run may hold, in one place.

    <runs_root>/<run_id>/
        config.json            what was asked, stamped with versions, git commit and device
        status.json            stage, step of total, updated_at, pid, error
        metrics.json           evaluation results keyed by stage (base_fp, base_nf4, unlearned_fp, ...)
        scorecard.json         the four properties, each pass/fail with its margin
        log.txt                the backend's log
        steps.jsonl            per-step unlearning stats, one JSON object a line
        stages.json            finished stages (resume starts after the last one)
        attribution/<stage>.json, <stage>.safetensors   graph per stage (before, after_fp, after_nf4)
        attribution/<stage>.circuit-tracer.json          the same in circuit-tracer's shape (circuit edges)
        circuit.json           the selected circuit and, per node, the parameter slices it owns (the masks)
        circuit_masks.safetensors                        full-shape masks (runs made before per-node masks only)
        inherited.json         a --from-run child's pointer to its parent's artifacts (resolved by the store)
        cad.json               CAD before vs after (fp and NF4), with intervals and per-edge contributions
        survival.json          survival of the update under NF4 (histograms, per layer)
        update.safetensors     the update delta and bin widths of updated parameters (floor preview)
        model_update.safetensors  the unlearned model as touched coordinates + values over the base (mansu export)
        model/                 the unlearned model (save_pretrained), only with --save-model
        attack_<kind>.json     a relearning attack's recovery curve and recovered fractions (mansu attack)
        certificate.json       the durability certificate: recovered fraction per attack and precision
"""

from pathlib import Path

CONFIG = "config.json"
STATUS = "status.json"
METRICS = "metrics.json"
SCORECARD = "scorecard.json"
LOG = "log.txt"
STEPS = "steps.jsonl"
STAGES = "stages.json"
ATTRIBUTION_DIR = "attribution"
CIRCUIT = "circuit.json"
CIRCUIT_MASKS = "circuit_masks.safetensors"
CAD = "cad.json"
SURVIVAL = "survival.json"
UPDATE = "update.safetensors"
MODEL_UPDATE = "model_update.safetensors"
INHERITED = "inherited.json"
MODEL_DIR = "model"
CERTIFICATE = "certificate.json"

ATTRIBUTION_STAGES = ("before", "after_fp", "after_nf4")


def attribution_json(run_dir: Path, stage: str) -> Path:
    """The graph JSON of one attribution stage."""
    return Path(run_dir) / ATTRIBUTION_DIR / f"{stage}.json"


def attribution_tracer_json(run_dir: Path, stage: str) -> Path:
    """The graph of one stage (its circuit's edges when it has one) in circuit-tracer's graph JSON shape."""
    return Path(run_dir) / ATTRIBUTION_DIR / f"{stage}.circuit-tracer.json"


def attribution_tensors(run_dir: Path, stage: str) -> Path:
    """The dense edge scores of one attribution stage."""
    return Path(run_dir) / ATTRIBUTION_DIR / f"{stage}.safetensors"


def attack_json(run_dir: Path, kind: str) -> Path:
    """The file of one relearning attack (mansu.attack.relearn.KINDS)."""
    return Path(run_dir) / f"attack_{kind}.json"
