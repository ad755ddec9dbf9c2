"""What a step costs: wall and CPU seconds and resident memory, measured around its compute.

``refusal-lab run`` records a :class:`StepCost` for every step it computes (kept in the step's
record, published as ``results["profile"]``); ``--profile`` prints them as a table. Peak memory is
sampled from ``/proc/self/statm`` every 20 ms on a background thread (the process's ``ru_maxrss``
cannot be reset between steps); where ``/proc`` is missing only the running maximum is known.
"""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

__all__ = ["GiB", "StepCost", "format_profile", "rss_bytes"]

GiB = 1024**3
_STATM = Path("/proc/self/statm")
_PAGE = resource.getpagesize()


def rss_bytes() -> int:
    """The process's resident set now (``/proc/self/statm``), else its peak so far (``ru_maxrss``)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepCost:
    """Context manager: ``with StepCost() as c: ...`` then ``c.record()`` — wall and CPU seconds, RSS
    at the start and its sampled peak (GiB)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> StepCost:
        self.start_rss = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    def record(self) -> dict:
        return {"wall_s": self.wall, "cpu_s": self.cpu, "rss_start_gib": self.start_rss / GiB,
                "peak_rss_gib": self.peak / GiB, "resumed": False}


def format_profile(profile: dict[str, dict], weights_gib: float | None = None) -> str:
    """A plain-text table of ``results["profile"]`` (one row per step, then the total)."""
    lines = [f"{'step':<34} {'wall s':>8} {'cpu s':>8} {'cpu/wall':>8} {'rss start':>10} {'peak rss':>9}"]
    wall = cpu = 0.0
    peak = 0.0
    for name, p in profile.items():
        note = "  (resumed: stored record)" if p.get("resumed") else ""
        ratio = p["cpu_s"] / p["wall_s"] if p["wall_s"] > 0 else float("nan")
        lines.append(f"{name:<34} {p['wall_s']:8.1f} {p['cpu_s']:8.1f} {ratio:8.2f} {p['rss_start_gib']:9.2f}G "
                     f"{p['peak_rss_gib']:8.2f}G{note}")
        if not p.get("resumed"):
            wall, cpu, peak = wall + p["wall_s"], cpu + p["cpu_s"], max(peak, p["peak_rss_gib"])
    lines.append(f"{'steps computed':<34} {wall:8.1f} {cpu:8.1f} {'':8} {'':10} {peak:8.2f}G")
    if weights_gib is not None:
        lines.append(f"model weights: {weights_gib:.2f} GiB (peak RSS / weights = {peak / weights_gib:.2f})")
    return "\n".join(lines)
