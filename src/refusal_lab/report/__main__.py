"""``python -m refusal_lab.report RUN_DIR [RUN_DIR ...] [--out DIR] [--no-figures]``.

One run folder: (re)writes ``figures/*.png`` and ``report.html`` inside it from its
``results.json``. Several: also a comparison (``comparison.html`` + PNGs) in ``--out`` (default
``./comparison``). A results file that is missing or of another schema version is refused with
one sentence and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refusal_lab.errors import RefusalLabError
from refusal_lab.report import compare_runs, write_figures, write_report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m refusal_lab.report", description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("comparison"), help="comparison output folder")
    ap.add_argument("--no-figures", action="store_true", help="skip the per-run PNGs")
    a = ap.parse_args(argv)
    dirs = list(dict.fromkeys(d.resolve() for d in a.run_dirs))
    try:
        for d in dirs:
            if not a.no_figures:
                write_figures(d, d / "figures")
            print(write_report(d))
        if len(dirs) > 1:
            print(compare_runs(dirs, a.out))
    except RefusalLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
