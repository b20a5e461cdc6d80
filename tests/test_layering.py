"""Rules that enforce themselves: the library never imports streamlit, metrics never import models, the views live
in views/ (a root pages/ folder switches Streamlit into legacy multipage mode and breaks deep links), ruff is clean,
and `pip install .` into a fresh virtual environment gives a working `mansu` command."""

from __future__ import annotations

import ast
import os
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _offenders(folder: str, banned: str) -> list[str]:
    return [f"{p.relative_to(REPO)} imports {name}" for p in sorted((REPO / folder).rglob("*.py"))
            for name in _imports(p) if name == banned or name.startswith(banned + ".")]


def test_the_library_never_imports_streamlit():
    assert _offenders("mansu", "streamlit") == []


def test_metrics_do_not_import_models():
    assert _offenders("mansu/metrics", "mansu.models") == []


def test_no_root_pages_folder():
    assert not (REPO / "pages").exists(), "keep pages in views/: a root pages/ folder is Streamlit's legacy mode"


def test_the_checker_sees_a_planted_violation(tmp_path):
    """The import scan is not vacuous: it finds streamlit in a module that imports it."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom streamlit import session_state\n")
    assert "streamlit" in _imports(bad)


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


def test_pip_install_gives_a_working_mansu_command(tmp_path):
    """A fresh venv, `pip install --no-deps .` (pip, setuptools and the dependencies come from the dev venv through a
    .pth file: no network), then the console script runs from outside the checkout and imports the installed copy."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "dev-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(REPO)],
                   check=True, cwd=tmp_path, env={**os.environ, "PIP_NO_INDEX": "1"})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(venv / "bin" / "mansu"), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "run" in out.stdout and "compare" in out.stdout
    where = subprocess.run([str(py), "-c", "import mansu, mansu.unlearn.methods; print(mansu.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.strip()
    assert where.startswith(purelib), where
