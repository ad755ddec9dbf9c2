"""``python -m refusal_lab.report RUN_DIR [RUN_DIR ...] [--out DIR] [--no-figures] [--sample DIR]``.

One run folder: writes ``figures/*.png`` and ``report.html`` inside it. Several: also a comparison
(``comparison.html`` + PNGs) in ``--out`` (default ``./comparison``). ``--sample DIR`` first writes a
synthetic ``results.json`` into DIR (for trying the report without a model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from refusal_lab.report import compare_runs, load_results, sample_results, write_figures, write_report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m refusal_lab.report", description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=Path("comparison"), help="comparison output folder")
    ap.add_argument("--no-figures", action="store_true", help="skip the per-run PNGs")
    ap.add_argument("--sample", type=Path, help="write a synthetic results.json into this folder first")
    a = ap.parse_args(argv)
    dirs = list(a.run_dirs)
    if a.sample:
        a.sample.mkdir(parents=True, exist_ok=True)
        (a.sample / "results.json").write_text(json.dumps(sample_results(), indent=1), encoding="utf-8")
        dirs.append(a.sample)
    dirs = list(dict.fromkeys(d.resolve() for d in dirs))
    if not dirs:
        ap.error("give at least one run folder (or --sample DIR)")
    for d in dirs:
        if not a.no_figures:
            write_figures(load_results(d), d / "figures")
        print(write_report(d))
    if len(dirs) > 1:
        print(compare_runs(dirs, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
