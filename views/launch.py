"""Launch: a form for model, data, method, hyperparameters (defaults shown, validated before start)
and device; it starts `python -m mansu run ...` as a separate process and shows its live progress."""

import dataclasses
from pathlib import Path

import streamlit as st

from mansu.appstate import ALIGNMENTS, DEVICES, METHODS, LaunchSpec, build_command, validate_spec
from mansu.paths import mansu_home
from ui import launch as ui_launch
from ui.state import selection

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
SHOWN = ("steps", "lr", "optimizer", "batch_size", "seed", "objective", "kappa", "epsilon", "k",
         "update_fraction", "retain_weight", "beta")

st.title("Launch a run")
selection()  # the shared sidebar


def _defaults() -> dict:
    try:
        from mansu.unlearn.config import UnlearnConfig
    except ImportError:
        return {}
    return {f.name: f.default for f in dataclasses.fields(UnlearnConfig) if f.name in SHOWN}


def _save_upload(upload, label: str) -> str:
    if upload.size > MAX_UPLOAD_BYTES:
        raise ValueError(f"{label} file is {upload.size / 1e6:.1f} MB: at most {MAX_UPLOAD_BYTES // 1_000_000} MB accepted")
    suffix = Path(upload.name).suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".parquet"):
        raise ValueError(f"{label} file {upload.name!r}: accepted are .jsonl, .json, .csv, .parquet")
    folder = mansu_home() / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{label}-{upload.file_id[:12]}{suffix}"
    path.write_bytes(upload.getvalue())
    return str(path)


def _validate_hparams(hparams: dict) -> None:
    try:
        from mansu.unlearn.config import UnlearnConfig
    except ImportError:
        return
    UnlearnConfig(**hparams)


defaults = _defaults()
try:
    from mansu.unlearn.config import METHODS as methods
    from mansu.unlearn.config import OBJECTIVES, OPTIMIZERS
    CHOICES = {"objective": OBJECTIVES, "optimizer": OPTIMIZERS}
except ImportError:
    methods, CHOICES = METHODS, {}

with st.form("launch-form"):
    demo = st.checkbox("use the embedded demo world and model", value=True, key="launch-demo")
    c1, c2 = st.columns(2)
    model = c1.text_input("model path or hub id (ignored for the demo)", key="launch-model")
    device = c2.selectbox("device", DEVICES, key="launch-device")
    forget_path = c1.text_input("forget file path", key="launch-forget")
    forget_up = c1.file_uploader("…or upload the forget file", type=["jsonl", "json", "csv", "parquet"], key="launch-forget-up")
    retain_path = c2.text_input("retain file path", key="launch-retain")
    retain_up = c2.file_uploader("…or upload the retain file", type=["jsonl", "json", "csv", "parquet"], key="launch-retain-up")
    m1, m2 = st.columns(2)
    method = m1.selectbox("method", methods, key="launch-method")
    alignment = m2.radio("base alignment", ALIGNMENTS, horizontal=True, key="launch-alignment",
                         help="natural: the fp32 base as trained; nf4-grid: every Linear weight snapped to its NF4 "
                              "round trip first (a checkpoint distributed as dequantized NF4). Results depend on it.")
    st.markdown("**hyperparameters** (defaults shown)")
    cols = st.columns(4)
    hparams = {}
    for i, (key, default) in enumerate(defaults.items()):
        col = cols[i % 4]
        if isinstance(default, bool):
            hparams[key] = col.checkbox(key, value=default, key=f"hp-{key}")
        elif isinstance(default, int):
            hparams[key] = int(col.number_input(key, value=default, step=1, key=f"hp-{key}"))
        elif isinstance(default, float):
            hparams[key] = float(col.number_input(key, value=default, format="%.6g", key=f"hp-{key}"))
        elif key in CHOICES:
            options = list(CHOICES[key])
            hparams[key] = col.selectbox(key, options, index=options.index(default) if default in options else 0,
                                         key=f"hp-{key}")
        else:
            hparams[key] = col.text_input(key, value=str(default), key=f"hp-{key}")
    submitted = st.form_submit_button("Start run", type="primary")

if submitted:
    try:
        forget = _save_upload(forget_up, "forget") if forget_up is not None else forget_path
        retain = _save_upload(retain_up, "retain") if retain_up is not None else retain_path
        _validate_hparams({**hparams, "method": method})
        changed = {k: v for k, v in hparams.items() if defaults.get(k) != v}
        spec = validate_spec(LaunchSpec(method=method, demo=demo, model=model, forget=forget, retain=retain,
                                        device=device, base_alignment=alignment, hparams=changed), tuple(methods))
        info = ui_launch.launch(build_command(spec), label=f"{method} ({alignment})")
        st.success(f"started: `{' '.join(info.command[1:])}`")
    except (ValueError, FileNotFoundError) as exc:
        st.error(f"not started: {exc}")

ui_launch.progress_panel()
