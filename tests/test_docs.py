"""The documentation site builds with ``mkdocs build --strict``: every page, link and
``::: module`` reference of the API pages resolves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS_EXTRA = "the docs extra is not installed (pip install -e '.[docs]')"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason=DOCS_EXTRA)
    pytest.importorskip("material", reason=DOCS_EXTRA)
    pytest.importorskip("mkdocstrings_handlers.python", reason=DOCS_EXTRA)
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                        "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert (site / "index.html").is_file() and (site / "tutorial.ipynb").is_file()


def test_reference_covers_every_public_package():
    """Each subpackage of refusal_lab has an API page (a new one must be added to docs/reference/)."""
    pages = "".join(p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: (refusal_lab[\w.]*)", pages, flags=re.M))
    packages = {f"refusal_lab.{p.name}" for p in (ROOT / "src" / "refusal_lab").iterdir()
                if (p / "__init__.py").is_file()}
    missing = {p for p in packages if not any(d == p or d.startswith(p + ".") for d in documented)}
    assert not missing, f"no API reference page documents {sorted(missing)}"
