"""The science pages the sweeps and `mansu compare` write into docs/ (each with its figures as PNG/SVG), for the
app's Science page: which pages there are, and each page as blocks of markdown and figures (Streamlit's markdown
does not load local images, so a figure line becomes an image block)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"

# (file in docs/, the command that regenerates it): one list, in reading order
SCIENCE_PAGES = (
    ("results.md", "mansu compare"),
    ("frontiers.md", "mansu sweep frontier"),
    ("localisation.md", "mansu sweep localisation"),
    ("heldout.md", "mansu sweep frontier --model-seed 3"),
    ("phase.md", "mansu sweep phase"),
)
_FIGURE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+\.(?:png|jpg|svg))\)(?P<rest>.*)$")


@dataclass(frozen=True)
class SciencePage:
    path: Path
    title: str
    command: str


@dataclass(frozen=True)
class Block:
    kind: str          # "markdown" or "figure"
    text: str          # the markdown, or the figure's caption
    figure: Path | None = None


def science_pages(docs: Path = DOCS) -> list[SciencePage]:
    """The SCIENCE_PAGES present under `docs`, titled by their first heading."""
    pages = []
    for name, command in SCIENCE_PAGES:
        path = docs / name
        if path.is_file():
            first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("# ")),
                         f"# {name}")
            pages.append(SciencePage(path, first[2:].strip(), command))
    return pages


def page_blocks(path: Path) -> list[Block]:
    """The page as markdown blocks split at its figure lines; a figure whose file is missing stays markdown."""
    blocks: list[Block] = []
    text: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _FIGURE.match(line.strip())
        figure = path.parent / m["src"] if m else None
        if figure is None or not figure.is_file() or figure.suffix == ".svg":
            text.append(line)
            continue
        if text:
            blocks.append(Block("markdown", "\n".join(text)))
            text = []
        blocks.append(Block("figure", m["alt"], figure))
    if text:
        blocks.append(Block("markdown", "\n".join(text)))
    return blocks
