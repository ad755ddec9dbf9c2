"""Figures, a self-contained HTML report and multi-run comparisons from a run folder's ``results.json``.

The results are read through :func:`refusal_lab.run.results.read_results` (typed, version
checked); each figure is described once in :mod:`refusal_lab.report.specs` and drawn twice, as a
PNG (:mod:`.figures`) and interactively (:mod:`.interactive`).
"""

from refusal_lab.report.common import headline
from refusal_lab.report.compare import compare_runs
from refusal_lab.report.figures import write_figures
from refusal_lab.report.html import render_report, write_report

__all__ = ["write_figures", "write_report", "render_report", "compare_runs", "headline"]
