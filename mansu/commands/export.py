"""`python -m mansu export RUN --out DIR`: a run's unlearned model as a save_pretrained folder.

A run stores its unlearned model as the sparse update over its base (model_update.safetensors: touched coordinates
and their values, mansu.unlearn.model_update).  Export rebuilds the model bit-exactly: load the base the run
names, align it as the run did (base_alignment), write the stored values (mansu.unlearn.params.put_values) and
save_pretrained (safetensors) with the base's tokenizer.  The run id, the update file and --out are checked before
the base loads: a bad one gives one `error:` line, exit status 2, and nothing written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mansu.choices import DEVICES
from mansu.models.loading import LoadedModel, load_model
from mansu.pipeline import resolve_inputs, save_model
from mansu.runs import layout
from mansu.runs.store import read_config, run_dir, validate_run_id
from mansu.spec import RunSpec
from mansu.unlearn.model_update import read_model_update
from mansu.unlearn.nf4_model import align_base
from mansu.unlearn.params import put_values


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="rebuild a run's unlearned model (base + its sparse update) as a "
                                             "save_pretrained folder",
                              description="Rebuild the unlearned model of RUN from its base model and the sparse "
                                          "update the run stored (model_update.safetensors), and save it with "
                                          "save_pretrained (safetensors weights + tokenizer) into DIR.")
    p.add_argument("run", metavar="RUN", help="run id (see `mansu runs`)")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to create (must not exist, or be empty)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where to rebuild the model (default cpu)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    run = run_dir(validate_run_id(args.run))
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty folder; give a new folder")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    lm = rebuild_model(run, device=args.device)
    save_model(lm.model, lm.tokenizer, out)
    print(f"wrote {out} (run {run.name}: base {lm.name} + {_count(run)} updated coordinates)")
    return 0


def rebuild_model(run: Path, *, device: str = "cpu") -> LoadedModel:
    """The unlearned model of `run`: its base, aligned as the run did, with the stored values written."""
    run = Path(run)
    values, meta = read_model_update(run / layout.MODEL_UPDATE)  # FileNotFoundError / ValueError before loading
    spec = RunSpec.from_dict(read_config(run)["spec"])
    lm = load_model(resolve_inputs(spec).model, dtype=meta.get("dtype", spec.dtype), device=device,
                    tokenizer=spec.tokenizer)
    align_base(lm.model, meta.get("base_alignment", spec.base_alignment), int(meta.get("blocksize", 64)))
    put_values(lm.model, values)
    return lm


def _count(run: Path) -> str:
    _, meta = read_model_update(run / layout.MODEL_UPDATE)
    return meta.get("n_coordinates", "?")
