"""The tutorial notebook: committed without outputs, in step with its jupytext pair, and executable
headless on the tiny random model (``REFUSAL_LAB_TUTORIAL_MODEL=tiny``) in well under a minute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
NOTEBOOK = DOCS / "tutorial.ipynb"
PAIRED = DOCS / "tutorial.py"
DOCS_EXTRA = "the docs extra is not installed (pip install -e '.[docs]')"


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "the tutorial has no code cells"
    dirty = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count") is not None]
    assert not dirty, f"code cells {dirty} of docs/tutorial.ipynb carry outputs; strip them before committing"


def test_notebook_matches_its_jupytext_pair():
    jupytext = pytest.importorskip("jupytext", reason=DOCS_EXTRA)
    nb = json.loads(NOTEBOOK.read_text())
    paired = jupytext.read(PAIRED)
    source = lambda c: "".join(c["source"]) if isinstance(c["source"], list) else c["source"]  # noqa: E731
    assert [(c["cell_type"], source(c)) for c in nb["cells"]] == \
        [(c["cell_type"], source(c)) for c in paired["cells"]], \
        "docs/tutorial.ipynb and docs/tutorial.py differ; run jupytext --sync docs/tutorial.py"


def test_tutorial_runs_headless(monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason=DOCS_EXTRA)
    nbclient = pytest.importorskip("nbclient", reason=DOCS_EXTRA)
    pytest.importorskip("ipykernel", reason=DOCS_EXTRA)
    monkeypatch.setenv("REFUSAL_LAB_TUTORIAL_MODEL", "tiny")  # the kernel inherits this environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(DOCS)}})
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "resid_mid + mlp_out == resid_post: exact" in text
    assert "max |engine - full forward|" in text and "largest |resid_post . r_hat| under ablation" in text
