"""Shared helpers of the bench scripts: timing, the JSON they write, tables.

Every script run by ``bench/run_all.py`` takes ``--quick`` (small sizes) and
``--json PATH`` and writes one JSON object (``Report``)::

    {"bench": name, "quick": bool, "device": "...", "dtype_note": "...",
     "tables": [{"title", "columns", "rows", "note"}],   # rows of strings
     "headlines": [{"name", "value", "text"}],            # quoted on the page
     "figures": [png paths], "raw": {...}}

``run_all.py`` renders the tables, in order, into ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# BENCH_OUT_DIR: where the raw JSON, logs and plots go (gpu.sh keeps its own).
OUT_DIR = Path(os.environ.get("BENCH_OUT_DIR") or BENCH_DIR / "out")


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    return ap


def steady(fn, repeats: int = 5) -> float:
    """Min wall time (s) of ``repeats`` calls after one warm-up; ``fn`` must block."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def first(fn) -> tuple[object, float]:
    """``(result, seconds)`` of one call (with tracing and compilation)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def fmt_s(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.2f} ms"
    return f"{x * 1e6:.1f} µs"


def fmt_x(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}x"


def faster(r: float | None, word: str = "faster", other: str = "slower") -> str:
    """``"2.9x faster"`` for a time ratio peer/ours ``r``; ``"1.2x slower"`` below 1."""
    if r is None or (isinstance(r, float) and math.isnan(r)):
        return "- (not measured)"
    return f"{fmt_x(r)} {word}" if r >= 1 else f"{fmt_x(1 / r)} {other}"


def fmt_e(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


class Report:
    """Collects tables and headlines; ``write()`` (also called on every table, so
    a script killed by its timeout leaves what it finished)."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        import jax

        dev = jax.devices()[0]
        self.path = args.json
        self.data: dict = {
            "bench": name,
            "quick": bool(args.quick),
            "device": f"{dev.platform} {dev.device_kind} x{len(jax.devices())}",
            "tables": [],
            "headlines": [],
            "figures": [],
            "raw": {},
        }
        print(
            f"== {name} ({'quick' if args.quick else 'full'}) on {self.data['device']}"
        )

    def table(self, title: str, columns: list[str], rows: list[list], note: str = ""):
        rows = [[str(c) for c in r] for r in rows]
        self.data["tables"].append(
            {"title": title, "columns": columns, "rows": rows, "note": note}
        )
        widths = [
            max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)
        ]
        print(f"\n-- {title}")
        print(
            "  " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
        )
        for r in rows:
            print("  " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if note:
            print(f"  ({note})")
        self.write()

    def headline(self, name: str, value: float | None, text: str) -> None:
        self.data["headlines"].append({"name": name, "value": value, "text": text})
        self.write()

    def figure(self, path: Path) -> None:
        self.data["figures"].append(str(path))
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float))
        tmp.replace(self.path)


def platforms_default() -> None:
    """CPU unless the caller chose a platform (``JAX_PLATFORMS``)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def interleaved(fns: dict, rounds: int = 10) -> dict:
    """Min wall time (s) of each blocking ``fn`` over ``rounds`` round-robin rounds
    after one warm-up each: the functions compared share every moment of the
    machine's load, as a ratio needs."""
    for fn in fns.values():
        fn()
    best = {k: math.inf for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def pipelined(fns: dict, calls: int = 20, rounds: int = 5) -> dict:
    """Min time per call (s) of each non-blocking ``fn`` when ``calls`` calls are
    issued back to back and waited for once, over ``rounds`` round-robin rounds
    after one warm-up each: the device's time per call once the host's dispatch
    and the one device-to-host wait overlap or are shared (what a loop over
    batches pays), beside :func:`interleaved`'s wait per call."""
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn())
    best = {k: math.inf for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready([fn() for _ in range(calls)])
            best[k] = min(best[k], (time.perf_counter() - t0) / calls)
    return best
