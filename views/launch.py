"""Launch: model, data, method and only the settings that method reads (defaults shown: the demo's settings on
the demo), validated as a RunSpec before anything starts; the backend runs `python -m mansu run --spec FILE`."""

import dataclasses
from pathlib import Path
from typing import get_args

import streamlit as st

from mansu.attribution.data import CORRUPTION_KINDS
from mansu.choices import ALIGNMENTS, DEVICES, DTYPES
from mansu.data.templates import DEFAULT_TEMPLATE, PRESETS
from mansu.options import choices, field_types
from mansu.paths import mansu_home
from mansu.spec import DEMO, RunSpec, demo_spec
from mansu.unlearn.config import UnlearnConfig
from mansu.unlearn.methods import METHODS
from mansu.unlearn.methods.base import COMMON_FIELDS
from ui import launch as ui_launch
from ui.state import page_preamble

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
DATA_TYPES = ["jsonl", "json", "csv", "parquet"]

page_preamble("Launch a run")


def _save_upload(upload, label: str) -> str:
    if upload.size > MAX_UPLOAD_BYTES:
        raise ValueError(f"{label} file is {upload.size / 1e6:.1f} MB: "
                         f"at most {MAX_UPLOAD_BYTES // 1_000_000} MB accepted")
    suffix = Path(upload.name).suffix.lower()
    if suffix.lstrip(".") not in DATA_TYPES:
        raise ValueError(f"{label} file {upload.name!r}: accepted are .jsonl, .json, .csv, .parquet")
    folder = mansu_home() / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{label}-{upload.file_id[:12]}{suffix}"
    path.write_bytes(upload.getvalue())
    return str(path)


def _setting_input(col, name: str, default, help_text: str):
    """One UnlearnConfig field as a widget of its type (choices for a Literal)."""
    tp, _ = field_types(UnlearnConfig)[name]
    key = f"hp-{name}"
    if choices(tp) is not None:
        options = list(get_args(tp))
        return col.selectbox(name, options, index=options.index(default), key=key, help=help_text)
    if tp is int:
        return int(col.number_input(name, value=int(default), step=1, key=key, help=help_text))
    if tp is float:
        return float(col.number_input(name, value=float(default), format="%.6g", key=key, help=help_text))
    return col.text_input(name, value=str(default), key=key, help=help_text)


method = st.selectbox("method", list(METHODS), key="launch-method",
                      format_func=lambda m: f"{m} — {METHODS[m].summary}")
demo = st.checkbox("use the embedded demo world and model", value=True, key="launch-demo")
defaults = (demo_spec(method) if demo else RunSpec(model=DEMO)).unlearn
field_help = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(UnlearnConfig)}

with st.form("launch-form"):
    c1, c2 = st.columns(2)
    model = c1.text_input("model path or hub id (ignored for the demo)", key="launch-model")
    device = c2.selectbox("device", DEVICES, key="launch-device")
    forget_path = c1.text_input("forget file path", key="launch-forget")
    forget_up = c1.file_uploader("…or upload the forget file", type=DATA_TYPES, key="launch-forget-up")
    retain_path = c2.text_input("retain file path", key="launch-retain")
    retain_up = c2.file_uploader("…or upload the retain file", type=DATA_TYPES, key="launch-retain-up")
    a1, a2 = st.columns(2)
    alignment = a1.radio("base alignment", ALIGNMENTS, horizontal=True, key="launch-alignment",
                         index=ALIGNMENTS.index("nf4-grid" if demo else "natural"),
                         help="natural: the fp32 base as trained; nf4-grid: every Linear weight snapped to its NF4 "
                              "round trip first (a checkpoint distributed as dequantized NF4). Results depend on it.")
    dtype = a2.radio("weights", DTYPES, horizontal=True, key="launch-dtype")
    t1, t2 = st.columns(2)
    template = t1.text_input("prompt template", value=DEFAULT_TEMPLATE, key="launch-template",
                             help=f"MCQ/QA prompt: {', '.join(PRESETS)}, wmdp:TOPIC, or a custom string with "
                                  "{question} (text records use none)")
    corruption = t2.selectbox("attribution corruption", CORRUPTION_KINDS, key="launch-corruption",
                              help="auto: subject when every record has one, else mean-ablation; shuffled-subject "
                                   "works on records without subjects (a shuffled partner's question or text)")
    st.markdown(f"**{method} settings** ({'the demo settings of docs/results.md' if demo else 'defaults'} shown; "
                "only the settings this method reads)")
    cols = st.columns(4)
    names = [*COMMON_FIELDS, *(n for n in METHODS[method].fields if n not in COMMON_FIELDS)]
    unlearn = {name: _setting_input(cols[i % 4], name, getattr(defaults, name), field_help[name])
               for i, name in enumerate(names)}
    submitted = st.form_submit_button("Start run", type="primary")

if submitted:
    try:
        forget = _save_upload(forget_up, "forget") if forget_up is not None else forget_path.strip()
        retain = _save_upload(retain_up, "retain") if retain_up is not None else retain_path.strip()
        config = dataclasses.replace(defaults, method=method, **unlearn)
        spec = RunSpec(model=DEMO if demo else model.strip(), forget="" if demo else forget,
                       retain="" if demo else retain, unlearn=config, base_alignment=alignment, device=device,
                       dtype=dtype, template=template.strip() or DEFAULT_TEMPLATE, corruption=corruption)
        info = ui_launch.launch([spec], label=f"{method} ({alignment})")
        st.success(f"started: `{' '.join(info.command[1:])}`")
    except (ValueError, FileNotFoundError) as exc:
        st.error(f"not started: {exc}")

ui_launch.progress_panel()
