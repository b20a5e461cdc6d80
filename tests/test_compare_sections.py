"""compare rewrites docs/results.md whole; the hand-written sections it lists in KEPT_SECTIONS (the relearning-attack
summary) survive the rewrite, and nothing else does."""

from __future__ import annotations

from mansu.commands.compare import KEPT_SECTIONS, kept_sections


def test_kept_sections_carry_over_only_the_listed_sections(tmp_path):
    table = tmp_path / "results.md"
    assert kept_sections(table) == ""  # no table yet
    table.write_text("# Results\n\n## NF4-grid-aligned base\n\nold rows\n\n## Relearning attacks\n\n| m | fp |\n"
                     "|---|---|\n| mansu | +0.35 |\n\n## Settings\n\nold settings\n")
    assert KEPT_SECTIONS == ("## Relearning attacks",)
    assert kept_sections(table) == "\n## Relearning attacks\n\n| m | fp |\n|---|---|\n| mansu | +0.35 |\n"
    table.write_text("# Results\n\n## Settings\n\nx\n\n## Relearning attacks\n\nlast section\n")
    assert kept_sections(table) == "\n## Relearning attacks\n\nlast section\n"
    table.write_text("# Results\n\n## Settings\n\nx\n")
    assert kept_sections(table) == ""
