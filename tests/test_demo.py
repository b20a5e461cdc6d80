"""The demo world is deterministic and fictitious-by-construction; the demo model memorises it."""

import pytest

from mansu.data.demo_world import ATTRIBUTES, WorldConfig, generate_world
from mansu.metrics.accuracy import mcq_accuracy


def test_world_is_deterministic_and_seeded():
    a, b, c = generate_world(WorldConfig(seed=0)), generate_world(WorldConfig(seed=0)), generate_world(WorldConfig(seed=1))
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


def test_demo_model_memorises_forget_and_retain(demo_lm, demo_records):
    for split in ("forget", "retain"):
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
