"""The reviewer report (mansu/viz/reviewer.py) and `mansu report`: run through the real CLI on sample runs written in
the real schemas; every section is there, its numbers are the runs' metrics to 3 significant digits, no machine path
leaks, only the runs asked for are in it, and a bad run id writes nothing."""

from __future__ import annotations

import dataclasses
import html as htmllib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

from mansu.io import read_json
from mansu.runs import layout
from mansu.runs.store import load_run
from mansu.testing import write_sample_run
from mansu.viz import reviewer
from mansu.viz.reviewer import SECTIONS

REPO = Path(__file__).resolve().parents[1]


def mansu(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MANSU_HOME": str(root), "MANSU_RUNS": str(root / "runs")}
    return subprocess.run([sys.executable, "-m", "mansu", *args], capture_output=True, text=True, cwd=root, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """Three finished sample runs (MANSU forgets to 1/3: a number that shows the rounding); a report of the first
    two, written by the CLI."""
    root = tmp_path_factory.mktemp("report")
    runs = [write_sample_run(root / "runs", "mansu", 0, 1 / 3), write_sample_run(root / "runs", "ga", 1, 0.6),
            write_sample_run(root / "runs", "npo", 2, 0.5)]
    out = root / "out" / "report.html"
    out.parent.mkdir()
    proc = mansu(root, "report", runs[0].name, runs[1].name, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return root, runs, out.read_text(encoding="utf-8")


def text_of(doc: str) -> str:
    """The document without scripts and tags (what a reader sees), entities decoded."""
    doc = re.sub(r"<script.*?</script>", "", doc, flags=re.S)
    return htmllib.unescape(re.sub(r"<[^>]+>", " ", doc))


def section(doc: str, name: str) -> str:
    match = re.search(rf"<section id='{name}'>(.*?)</section>", doc, flags=re.S)
    assert match, f"section {name} missing"
    return match.group(1)


def test_every_section_in_order_and_self_contained(sample):
    _, _, doc = sample
    starts = [doc.index(f"<section id='{name}'>") for name in SECTIONS]
    assert starts == sorted(starts)
    for name, heading in zip(SECTIONS, ("Claim and verdict", "Setup", "Results", "Figures", "Limitations",
                                        "Reproduce")):
        assert f"<h2>{heading}</h2>" in section(doc, name)
    assert "<script src=" not in doc and "<link" not in doc  # nothing fetched: plotly.js inlined
    assert doc.count("plotly.js v") == 1  # once, shared by every figure
    assert doc.count("Plotly.newPlot") == len(re.findall(r"<figure>", doc)) >= 5
    assert len(re.findall(r"<figcaption>", doc)) == len(re.findall(r"<figure>", doc))


def test_numbers_match_the_metrics_to_three_digits(sample):
    _, runs, doc = sample
    results = text_of(section(doc, "results"))
    for run in runs[:2]:
        m = read_json(run / layout.METRICS)
        for stage in ("base_fp", "base_nf4", "unlearned_fp", "unlearned_nf4"):
            for split in ("forget", "retain"):
                r = m[stage][split]
                assert f"{r['accuracy']:.3g} [{r['ci_low']:.3g}, {r['ci_high']:.3g}]" in results, (stage, split)
        gap = m["ptq_gap"]["forget"]
        assert f"{gap['gap']:+.3g} [{gap['ci_low']:+.3g}, {gap['ci_high']:+.3g}]" in results
        cad = read_json(run / layout.CAD)["after_nf4"]
        assert f"{cad['value']:.3g} [{cad['ci_low']:.3g}, {cad['ci_high']:.3g}]" in results
    visible = text_of(doc)
    assert "0.333 [0.283, 0.383]" in results and "0.3333" not in visible  # 3 significant digits, never raw floats
    claim = text_of(section(doc, "claim"))
    assert "lowered forget accuracy from 1 to 0.333 in full precision; after NF4 it is 0.353" in claim
    assert "PTQ gap +0.02 [-0.01, +0.05]" in claim and "passes 3 of 4" in claim
    assert "Verdict:" in claim and "NF4 brings some of it back" in claim


def test_setup_limitations_and_reproduce(sample):
    _, runs, doc = sample
    setup = text_of(section(doc, "setup"))
    for expected in ("forget.jsonl (200 records scored)", "nf4-grid", "blocksize 64", "kappa=1", "torch ",
                     "cad_threshold 0.3", "mansu on nf4-grid: 1 seed", "none (ga has no magnitude floor)"):
        assert expected in setup, expected
    limits = text_of(section(doc, "limitations"))
    assert "reconstruction" in limits and "not public" in limits and "grid-aligned base (nf4-grid)" in limits
    assert "Fewer than 3 seeds" in limits
    repro = text_of(section(doc, "reproduce"))
    assert f"mansu run --spec {runs[0].name}.spec.json" in repro
    assert f"mansu report {runs[0].name} {runs[1].name} --out report.html" in repro
    assert '"method": "mansu"' in repro  # the spec JSON is shown, and can be saved as the file the command reads
    link = re.search(rf"<a download='{runs[0].name}.spec.json' href='data:application/json;charset=utf-8,([^']*)'",
                     section(doc, "reproduce"))
    saved = json.loads(unquote(htmllib.unescape(link.group(1))))
    assert saved == {k: v for k, v in read_json(runs[0] / layout.CONFIG)["spec"].items()}


def test_only_the_runs_asked_for_and_no_machine_paths(sample):
    root, runs, doc = sample
    assert runs[0].name in doc and runs[1].name in doc and runs[2].name not in doc  # npo: in the folder, not asked
    assert str(root) not in doc and str(Path.home()) + "/" not in doc and "/tmp/" not in doc
    bars = re.search(r'"name":"forget fp".*?"x":\[(.*?)\]', doc)
    assert bars and bars.group(1).count("mansu") == 1 and bars.group(1).count("ga ") == 1  # both runs in the bars


@pytest.mark.parametrize("bad", ["../etc", "20991130-000000-nope", "not-an-id"])
def test_a_bad_run_id_writes_nothing(sample, bad):
    root, runs, _ = sample
    out = root / "out" / f"bad-{bad.replace('/', '_')}.html"
    proc = mansu(root, "report", runs[0].name, bad, "--out", str(out))
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_same_label_twice_keeps_both_runs(sample):
    """Two runs whose labels collide (same method, base, seed and time of day on another date) are both drawn."""
    from mansu.viz.report import comparison_figures

    _, runs, _ = sample
    first = load_run(runs[0].name, runs[0].parent)
    twin = dataclasses.replace(first, run_id="20200101-" + first.run_id.split("-", 1)[1])
    figs = comparison_figures([first, twin])
    assert len(figs["fp vs NF4 accuracy"].data[0].x) == 2
    assert len(reviewer.labels_of([first, twin])) == len(set(reviewer.labels_of([first, twin])))


def test_quadrant_axis_names_its_precision(sample):
    from mansu.viz.report import comparison_figures

    _, runs, _ = sample
    loaded = [load_run(r.name, r.parent) for r in runs]
    for which, name in (("nf4", "NF4"), ("fp", "fp")):
        fig = comparison_figures(loaded, which=which)[f"suppression vs erasure ({name})"]
        assert fig.layout.xaxis.title.text.endswith(f"unlearned {name}") and name in fig.layout.yaxis.title.text
        labels, positions = list(fig.data[0].text), list(fig.data[0].textposition)
        ga, npo = (next(p for lab, p in zip(labels, positions) if lab.startswith(m)) for m in ("ga ", "npo "))
        assert ga != npo  # GA and NPO sit side by side (CAD 0.08, drops 0.1 apart): their labels do not overlap


def test_demo_run_reproduces_with_the_demo_flags(sample):
    from mansu.spec import demo_spec

    _, runs, _ = sample
    run = load_run(runs[0].name, runs[0].parent)
    demo = dataclasses.replace(run, config={**run.config, "spec": demo_spec("mansu", seed=2).to_dict()})
    assert reviewer.reproduce_command(demo) == "mansu run --demo --method mansu --seed 2 --base-alignment nf4-grid"
    changed = demo_spec("mansu", seed=2, kappa=3.0).to_dict()
    assert reviewer.reproduce_command(dataclasses.replace(run, config={**run.config, "spec": changed})) \
        == f"mansu run --spec {run.run_id}.spec.json"
    assert reviewer.model_name({"model": "/home/someone/models/llama-3-8b"}) == "llama-3-8b"
    assert reviewer.model_name({"model": "demo"}).startswith("demo (embedded Llama")
    doc = reviewer.reviewer_report([demo])
    assert "Demo scale" in text_of(section(doc, "limitations"))


def test_formatting():
    assert [reviewer.fmt(v) for v in (0.3333, -0.01667, 0.09667, 1.0, None)] == ["0.333", "-0.0167", "0.0967", "1",
                                                                                  "n/a"]
    assert reviewer.fmt(0.02, signed=True) == "+0.02" and reviewer.fmt(-0.0, signed=True) == "0"
    with pytest.raises(ValueError, match="at least one run"):
        reviewer.reviewer_report([])


def test_comparison_runs_are_overlaid_on_the_update_histogram(sample):
    from mansu.viz.report import run_figures

    _, runs, _ = sample
    mansu_run, ga_run = (load_run(r.name, r.parent) for r in runs[:2])
    figs, missing = run_figures(mansu_run, [ga_run])
    names = [t.name for t in figs["update vs NF4 bin width"].data]
    assert len(names) == 2 and names[0].startswith("mansu") and names[1].startswith("ga") and not missing


def test_base_alignment_diagnostic_in_words(sample):
    _, runs, _ = sample
    run = load_run(runs[0].name, runs[0].parent)
    diag = {"setting": "nf4-grid", "frac_on_grid": 1.0, "n_weights": 94799, "mean_distance": 0.0}
    aligned = dataclasses.replace(run, metrics={**run.metrics, "base_alignment": diag})
    setup = text_of(section(reviewer.reviewer_report([aligned]), "setup"))
    assert "nf4-grid: 100% of 94,799 quantizable weights on the NF4 grid" in setup


def test_ptq_gap_per_quantizer_in_results_and_figures(sample):
    _, runs, _ = sample
    run = load_run(runs[0].name, runs[0].parent)
    by_q = {"nf4": {"forget": {"gap": 0.02, "ci_low": -0.01, "ci_high": 0.05}},
            "int4-g128": {"forget": {"gap": 0.0833, "ci_low": 0.0417, "ci_high": 0.125}}}
    doc = reviewer.reviewer_report([dataclasses.replace(run, metrics={**run.metrics, "ptq_gap_by_quantizer": by_q}),
                                    load_run(runs[1].name, runs[1].parent)])
    results = text_of(section(doc, "results"))
    assert "PTQ gap (forget, int4-g128 − fp) +0.0833 [+0.0417, +0.125] n/a" in " ".join(results.split())
    assert "Figure 2. PTQ gap per quantizer." in text_of(section(doc, "figures"))
