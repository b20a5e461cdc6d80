"""The demo world is deterministic and fictitious-by-construction; the demo model memorises it."""

import pytest

from mansu.data.demo_world import ATTRIBUTES, WorldConfig, generate_world
from mansu.metrics.accuracy import mcq_accuracy


def test_world_is_deterministic_and_seeded():
    a, b = generate_world(WorldConfig(seed=0)), generate_world(WorldConfig(seed=0))
    c = generate_world(WorldConfig(seed=1))
    assert a.facts == b.facts and a.mcq == b.mcq
    assert a.facts != c.facts


def test_splits_are_disjoint_and_sized():
    world = generate_world(WorldConfig(n_entities=100, forget_fraction=0.15, probe_fraction=0.1))
    forget, retain, probe = (set(world.splits[k]) for k in ("forget", "retain", "probe"))
    assert (len(forget), len(probe), len(retain)) == (15, 10, 75)
    assert not (forget & retain) and not (forget & probe) and not (retain & probe)
    assert len(world.mcq["forget"]) == 15 * len(ATTRIBUTES)
    for record in world.mcq["forget"]:
        assert record.subject in forget and record.question.count(record.subject) == 1
        assert len(record.choices) == 4 and len(set(record.choices)) == 4
        attribute = next(a for a, (q, _, _) in ATTRIBUTES.items() if q.format(s=record.subject) == record.question)
        assert record.choices[record.answer] == world.facts[record.subject][attribute]


def test_bad_world_config():
    with pytest.raises(ValueError, match="forget_fraction"):
        WorldConfig(forget_fraction=1.5)
    with pytest.raises(ValueError, match="n_entities"):
        WorldConfig(n_entities=3)


def test_demo_model_memorises_every_split(demo_lm, demo_records):
    for split in ("forget", "retain", "probe"):
        res = mcq_accuracy(demo_lm.model, demo_lm.tokenizer, demo_records[split])
        assert res.accuracy >= 0.99, (split, res)


def test_demo_is_reused_not_rebuilt(demo_assets):
    from mansu.models.demo import ensure_demo

    before = (demo_assets.model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo(demo_assets.root).model_dir == demo_assets.model_dir
    assert (demo_assets.model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_letter_format_tokenizes_without_unknowns(demo_lm, demo_records):
    from mansu.metrics.accuracy import letter_texts

    context, conts = letter_texts(demo_records["forget"][0])
    ids = demo_lm.tokenizer(context + "".join(conts))["input_ids"]
    assert demo_lm.tokenizer.unk_token_id not in ids


# --- the build: a fixed, machine-independent schedule, a fast check equal to mcq_accuracy, progress records ---

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, warmup_steps=2, epochs=2)


def test_batch_plan_is_seeded_and_complete():
    from mansu.models.demo import DemoModelConfig, batch_plan

    config = DemoModelConfig(batch_size=50, epochs=2)
    plan = batch_plan(1000, config)
    assert plan == batch_plan(1000, config)
    assert plan != batch_plan(1000, DemoModelConfig(batch_size=50, epochs=2, seed=1))
    assert len(plan) == 40 and plan[:20] != plan[20:]
    for epoch in (plan[:20], plan[20:]):                 # every example exactly once per epoch
        assert sorted(i for batch in epoch for i in batch) == list(range(1000))


def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    from mansu.models.demo import lr_factor

    assert lr_factor(0, 10, 100, 0.2) == pytest.approx(0.1) and lr_factor(9, 10, 100, 0.2) == pytest.approx(1.0)
    assert lr_factor(50, 10, 100, 0.2) == 1.0 and lr_factor(80, 10, 100, 0.2) == 1.0
    assert lr_factor(90, 10, 100, 0.2) == pytest.approx(0.5) and lr_factor(99, 10, 100, 0.2) == pytest.approx(0.05)
    assert lr_factor(100, 10, 100, 0.2) == 0.0


def test_bad_model_config():
    from mansu.models.demo import DemoModelConfig

    with pytest.raises(ValueError, match="epochs"):
        DemoModelConfig(epochs=0)
    with pytest.raises(ValueError, match="target_accuracy"):
        DemoModelConfig(target_accuracy=0)
    with pytest.raises(ValueError, match="decay_fraction"):
        DemoModelConfig(decay_fraction=0)


def test_cloze_check_equals_mcq_accuracy(demo_lm, demo_records):
    from mansu.models.demo import cloze_check

    for split in ("forget", "probe"):
        records = demo_records[split]
        reference = mcq_accuracy(demo_lm.model, demo_lm.tokenizer, records)
        fast = cloze_check(demo_lm.model, demo_lm.tokenizer, records)
        assert fast["accuracy"] == pytest.approx(reference.accuracy)
        assert (fast["min_margin"] > 0) == all(reference.correct)


def test_demo_meta_records_recipe_and_tolerance(demo_assets):
    from mansu.io import read_json
    from mansu.models.demo import RECIPE_VERSION, DemoModelConfig

    meta = read_json(demo_assets.model_dir / "demo_meta.json")
    assert meta["recipe_version"] == RECIPE_VERSION
    assert meta["steps"] == DemoModelConfig().epochs * 13            # 800 QA lines in batches of 64, every epoch
    assert min(meta["accuracy_cloze"].values()) >= meta["config"]["target_accuracy"] == 0.99
    assert meta["threads"] >= 1 and meta["cpu_capability"]


def test_build_records_progress_and_reuses(tmp_path):
    from mansu.data.demo_world import WorldConfig
    from mansu.io import read_json
    from mansu.models.demo import DemoModelConfig, demo_build_progress, ensure_demo

    root = tmp_path / "demo"
    seen = []

    def progress(step, total, info):
        seen.append((step, total))
        if step == 1:
            seen.append(demo_build_progress(root))
    assets = ensure_demo(root, world_config=WorldConfig(n_entities=10),
                         model_config=DemoModelConfig(**TINY, target_accuracy=0.01), progress=progress, threads=1)
    during = seen.pop(1)
    assert during["stage"] == "training" and during["active"] and during["step"] == 1
    assert during["eta_s"] is None                                  # not guessed before any step was timed
    total = seen[0][1]
    assert seen == [(s, total) for s in range(1, total + 1)] and total == 2 * 2     # 80 QA lines, batch 64
    done = demo_build_progress(root)
    assert done["stage"] == "done" and done["fraction"] == 1.0 and not done["active"] and done["eta_s"] == 0
    assert done["step"] == done["total_steps"] == total
    mtime = (assets.model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo(root, world_config=WorldConfig(n_entities=10),
                       model_config=DemoModelConfig(**TINY, target_accuracy=0.01)).model_dir == assets.model_dir
    assert (assets.model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert read_json(assets.model_dir / "demo_meta.json")["steps"] == total


def test_failed_build_is_recorded_and_leaves_no_model(tmp_path):
    from mansu.data.demo_world import WorldConfig
    from mansu.models.demo import DemoModelConfig, demo_build_progress, ensure_demo, is_complete

    root = tmp_path / "demo"
    with pytest.raises(RuntimeError, match="target 0.99 on every split"):
        ensure_demo(root, world_config=WorldConfig(n_entities=10), model_config=DemoModelConfig(**TINY), threads=1)
    state = demo_build_progress(root)
    assert state["stage"] == "failed" and not state["active"] and "RuntimeError" in state["error"]
    assert not (root / "model").exists()
    from mansu.models.demo import demo_assets as assets_at
    assert not is_complete(assets_at(root))


def test_progress_of_a_running_and_a_dead_build(tmp_path):
    import os
    import subprocess
    import sys

    from mansu.io import write_json_atomic
    from mansu.models.demo import PROGRESS_FILE, _host, demo_build_progress

    assert demo_build_progress(tmp_path) is None
    record = {"stage": "training", "step": 30, "total_steps": 120, "eta_s": 40.0, "started_at": 1000.0,
              "updated_at": 1010.0, "pid": os.getpid(), "host": _host(), "recipe_version": 2}
    write_json_atomic(tmp_path / PROGRESS_FILE, record)
    live = demo_build_progress(tmp_path, now=1015.0)
    assert live["active"] and live["fraction"] == 0.25 and live["eta_s"] == 35.0 and live["elapsed_s"] == 15.0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_json_atomic(tmp_path / PROGRESS_FILE, {**record, "pid": int(dead.stdout)})
    gone = demo_build_progress(tmp_path, now=1015.0)
    assert not gone["active"] and gone["stage"] == "training" and gone["eta_s"] == 40.0


def test_cli_progress_lines_without_a_terminal():
    import io

    from mansu.commands.demo import LogProgress

    out = io.StringIO()
    log_progress = LogProgress(every=3600, stream=out)
    for step in range(1, 11):
        log_progress(step, 10, {"loss": 1.5})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("training demo model: step 1/10 (10%)")
    assert "step 10/10 (100%)" in lines[1] and "ETA 0 s" in lines[1]


def test_second_builder_waits_for_the_first_and_reuses_its_model(tmp_path):
    import threading

    from mansu.data.demo_world import WorldConfig
    from mansu.models.demo import DemoModelConfig, _build, _build_lock, ensure_demo
    from mansu.models.demo import demo_assets as assets_at

    root, world, config = tmp_path / "demo", WorldConfig(n_entities=10), DemoModelConfig(**TINY, target_accuracy=0.01)
    root.mkdir()
    second: list = []
    waiter = threading.Thread(target=lambda: second.append(ensure_demo(root, world_config=world, model_config=config,
                                                                       threads=1)))
    with _build_lock(root):                          # the first builder holds the lock while it builds
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not second      # the second waits instead of building alongside
        first = _build(assets_at(root), world, config, None, 1)
        mtime = (first.model_dir / "model.safetensors").stat().st_mtime_ns
    waiter.join(timeout=60)
    assert second and second[0].model_dir == first.model_dir
    assert (first.model_dir / "model.safetensors").stat().st_mtime_ns == mtime      # reused, not rebuilt
