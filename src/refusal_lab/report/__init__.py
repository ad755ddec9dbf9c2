"""Figures, a self-contained HTML report and multi-run comparisons from a run folder's ``results.json``."""

from refusal_lab.report.common import headline, load_results
from refusal_lab.report.compare import compare_runs
from refusal_lab.report.figures import write_figures
from refusal_lab.report.html import render_report, write_report
from refusal_lab.report.sample import sample_results

__all__ = ["write_figures", "write_report", "render_report", "compare_runs", "headline", "load_results",
           "sample_results"]
