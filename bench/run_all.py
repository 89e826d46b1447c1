"""Run every benchmark, side by side on this machine, and write ``bench/RESULTS.md``.

Each bench script runs in its own process with a timeout and writes its JSON to
``bench/out/`` (git-ignored); this driver then renders one page from the JSON:
the machine (CPU model, cores, JAX device, how busy the machine was), package
versions, the date, every table and the plots (copied to ``figures/`` beside the page).
A script that fails or runs out of time is reported on the page with the tail
of its log; the rest of the page is still written.

    python bench/run_all.py            # everything (up to ~30 minutes)
    python bench/run_all.py --quick    # small sizes, < 3 minutes, page marked QUICK
    python bench/run_all.py --render   # re-render RESULTS.md from bench/out/

Options: ``--gpu`` (``bench/gpu.sh``'s set: no pgmpy/PGMax, whose venvs need the
network), ``--skip``/``--only`` (jobs), ``--results PATH`` (write the page
elsewhere), ``--deadline-s``, ``--timeout-scale X`` (or ``BENCH_TIMEOUT_SCALE``:
every timeout times X on a busy machine; the page says so). From make:
``make bench QUICK=1 BENCH_ARGS="--timeout-scale 2"``.
Peers that live in their own venvs (pgmpy, PGMax) are built on first use by a
full run; a quick run uses them only when they are already built
(``BENCH_BUILD_VENVS=0``), so that it stays within its budget.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# BENCH_OUT_DIR: where the raw JSON, logs and plots go (gpu.sh keeps its own).
OUT_DIR = Path(os.environ.get("BENCH_OUT_DIR") or BENCH_DIR / "out")
RESULTS = BENCH_DIR / "RESULTS.md"
GPU_RUNS = BENCH_DIR / "gpu_runs.md"
sys.path.insert(0, str(BENCH_DIR))

from bench_compiler import (  # noqa: E402
    _busy_cpu_s,
    _children_cpu_s,
    _cpu_model,
    _git_state,
    _other_cores,
)
from common import faster, fmt_e, fmt_s, fmt_x, ratio  # noqa: E402

#: name -> (script, quick args, full args, quick timeout s, full timeout s).
JOBS = {
    "compiler": (
        "bench_compiler.py",
        ["--quick", "--only", "rm,ising"],
        [],
        70,
        900,
    ),
    "drm": ("bench_drm.py", ["--quick"], [], 50, 400),
    "pgmpy": ("bench_pgmpy.py", ["--quick"], [], 35, 300),
    "learning": ("bench_learning.py", ["--quick"], [], 25, 200),
    "em_svi": ("bench_em_svi.py", ["--quick", "--n", "200"], [], 30, 200),
    "generic": ("bench_generic.py", ["--quick"], [], 45, 480),
}


#: ``--gpu`` (``bench/gpu.sh``): the device-bound jobs at full size, no peers that
#: need their own venv (no network there), within about 5 minutes.
GPU_JOBS = {
    "compiler": (["--only", "rm"], 80),
    "drm": (["--a-large", "32768"], 150),
    "learning": ([], 35),
    "em_svi": ([], 25),
}


def say(*a) -> None:
    print(*a, flush=True)


def machine_info() -> dict:
    code = (
        "import json, importlib.metadata as md, platform, jax\n"
        "def v(n):\n"
        "    try:\n"
        "        return md.version(n)\n"
        "    except md.PackageNotFoundError:\n"
        "        return None\n"
        "d = jax.devices()\n"
        "print(json.dumps({'device': f'{d[0].platform} {d[0].device_kind}',"
        " 'n_devices': len(d), 'python': platform.python_version(),"
        " 'versions': {n: v(n) for n in ('jax', 'jaxlib', 'numpyro', 'funsor',"
        " 'numpy', 'optax', 'networkx', 'scikit-learn', 'matplotlib')}}))\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:  # report, don't stop
        info = {"device": f"unknown ({type(exc).__name__})", "versions": {}}
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info.update(cpu=_cpu_model(), cpu_count=os.cpu_count(), cores_usable=cores)
    info["versions"]["pgm_drm (git)"] = _git_state()
    return info


def run_job(name: str, quick: bool, timeout: float, env: dict, gpu: bool) -> dict:
    script, qargs, fargs, _, _ = JOBS[name]
    out = OUT_DIR / f"{name}.json"
    log = OUT_DIR / f"{name}.log"
    if out.exists():
        out.unlink()
    args = qargs if quick else fargs
    if gpu:
        args = qargs if quick else GPU_JOBS[name][0]
        if name == "compiler":
            args = (["--quick"] if quick else []) + GPU_JOBS[name][0]
    cmd = [sys.executable, str(BENCH_DIR / script), *args]
    if name != "compiler":  # bench_compiler writes out/compiler.json itself
        cmd += ["--json", str(out)]
    else:  # stop its cases in time to write its JSON before our timeout
        cmd += ["--deadline-s", f"{max(10.0, timeout - 20):.0f}"]
    say(f"-- {name}: {' '.join(cmd[1:])} (timeout {timeout:.0f} s)")
    busy0, kids0 = _busy_cpu_s(), _children_cpu_s()
    t0 = time.perf_counter()
    status = "ok"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=BENCH_DIR,
            env=env,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
            if rc != 0:
                status = f"error (exit {rc})"
        except subprocess.TimeoutExpired:
            # SIGTERM first: bench_compiler then stops its running case (its own
            # session) and writes what it finished; SIGKILL whatever is left.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = f"timeout ({timeout:.0f} s)"
    wall = time.perf_counter() - t0
    busy1 = _busy_cpu_s()
    others = None
    if busy0 is not None and busy1 is not None and wall > 0:
        others = max(0.0, ((busy1 - busy0) - (_children_cpu_s() - kids0)) / wall)
    tail = log.read_text()[-1200:] if log.exists() else ""
    say(
        f"   {status}, {wall:.0f} s"
        + (f", other processes {others:.2f} cores" if others is not None else "")
    )
    return {
        "status": status,
        "wall_s": wall,
        "other_cores": others,
        "log_tail": tail if status != "ok" else "",
    }


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #


def md_table(columns, rows) -> str:
    def cell(x):
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def compiler_tables(c: dict) -> tuple[list[dict], list[dict]]:
    """Tables and headlines from ``bench_compiler``'s own JSON."""
    tables, heads = [], []
    cases = c.get("cases", {})
    rm = cases.get("rm", {})
    us = rm.get("us_per_image", {})
    if us:
        n = rm.get("n_images")
        ours_z, ours_m = us.get("ours_sum_logz_only"), us.get("ours_max_map_only")
        rows = [
            [
                "log Z",
                "ours `infer(fg, 'sum', map=False, marginals=False)`",
                f"{us.get('ours_sum_logz_only', float('nan')):.2f}",
                "1x",
            ],
            [
                "log Z",
                "NumPyro `log_density` (funsor enumeration), jit + vmap",
                f"{us.get('numpyro_log_density', float('nan')):.2f}",
                fmt_x(ratio(us.get("numpyro_log_density"), ours_z)),
            ],
            [
                "log Z + every marginal",
                "ours `infer(fg, 'sum', map=False)`",
                f"{us.get('ours_sum_nomap', float('nan')):.2f}",
                fmt_x(ratio(us.get("ours_sum_nomap"), ours_z)),
            ],
            [
                "log Z + every marginal + MAP",
                "ours `infer(fg, 'sum')`",
                f"{us.get('ours_sum', float('nan')):.2f}",
                fmt_x(ratio(us.get("ours_sum"), ours_z)),
            ],
            [
                "log Z, sum",
                "`enumerate_exact` (per image)",
                f"{us.get('enumerate_exact_sum', float('nan')):.0f}",
                fmt_x(ratio(us.get("enumerate_exact_sum"), ours_z)),
            ],
            [
                "MAP",
                "ours `infer(fg, 'max', marginals=False)`",
                f"{us.get('ours_max_map_only', float('nan')):.2f}",
                "1x",
            ],
            [
                "MAP",
                "NumPyro `infer_discrete(temperature=0)`, jit + vmap",
                f"{us.get('numpyro_infer_discrete', float('nan')):.2f}",
                fmt_x(ratio(us.get("numpyro_infer_discrete"), ours_m)),
            ],
            [
                "MAP",
                "`enumerate_exact(semiring='max')` (per image)",
                f"{us.get('enumerate_exact_max', float('nan')):.0f}",
                fmt_x(ratio(us.get("enumerate_exact_max"), ours_m)),
            ],
            [
                "floor",
                "one numpy matmul images x templates",
                f"{us.get('numpy_matmul', float('nan')):.2f}",
                fmt_x(ratio(us.get("numpy_matmul"), ours_z)),
            ],
        ]
        tables.append(
            {
                "title": f"RM (10 classes x 16 nuisances, 8x8, switch, float64), {n} "
                "images: compiled kernel vs NumPyro",
                "columns": ["query", "who", "µs / image", "time / ours"],
                "rows": rows,
                "note": f"agreement: max |log Z ours - NumPyro| "
                f"{fmt_e(rm.get('max_abs_log_z_diff'))}; MAP equal to "
                f"infer_discrete's on "
                f"{rm.get('map_agreement_numpyro', float('nan')):.4f} "
                f"of the images; vs enumerate_exact |log Z| "
                f"{fmt_e(rm.get('enumerate_exact_sum_max_abs_log_z_diff'))} (sum), "
                f"{fmt_e(rm.get('enumerate_exact_max_max_abs_log_z_diff'))} (max). "
                "Ours compiles the user's NumPyro model once (compile_model) "
                f"in {fmt_s(rm.get('compile_s'))}; NumPyro's first call "
                f"{fmt_s(rm.get('numpyro_first_result_s'))}.",
            }
        )
        r = ratio(us.get("numpyro_log_density"), ours_z)
        heads.append(
            {
                "name": "rm_logz_vs_numpyro",
                "value": r,
                "text": f"RM log Z: {faster(r)} than NumPyro's jitted, "
                "vmapped `log_density`",
            }
        )
        r = ratio(us.get("numpyro_infer_discrete"), ours_m)
        heads.append(
            {
                "name": "rm_map_vs_numpyro",
                "value": r,
                "text": f"RM MAP: {faster(r)} than NumPyro's jitted, "
                "vmapped `infer_discrete`",
            }
        )
    rows = []
    for key, d in sorted(cases.items()):
        if not key.startswith("ising") or not isinstance(d, dict):
            continue
        for sem in ("sum", "max"):
            o, pg = d.get(sem, {}), d.get(f"pgmax_{sem}", {})
            cmp_ = d.get(f"compare_{sem}", {})
            rows.append(
                [
                    f"{key[5:]}x{key[5:]}",
                    sem,
                    fmt_s(o.get("per_run_s")),
                    fmt_s(pg.get("per_run_s"))
                    if pg.get("status") == "ok"
                    else f"not run ({pg.get('status')})",
                    fmt_x(ratio(o.get("per_run_s"), pg.get("per_run_s"))),
                    fmt_s(o.get("first_result_s")),
                    fmt_s(pg.get("first_result_s")),
                    fmt_s(d.get("numpyro_run_s")),
                    fmt_e(cmp_.get("max_abs_marginal_diff")),
                    "-"
                    if "map_agreement" not in cmp_
                    else f"{cmp_['map_agreement']:.4f}",
                    f"{_iters_to_tol(o)} / "
                    + (_iters_to_tol(pg) if pg.get("status") == "ok" else "-"),
                ]
            )
            if pg.get("status") == "ok" and sem == "sum":
                r = ratio(pg.get("per_run_s"), o.get("per_run_s"))
                heads.append(
                    {
                        "name": f"ising_{key}",
                        "value": r,
                        "text": f"Ising {key[5:]}x{key[5:]} loopy BP (sum, 100 "
                        f"iterations): {faster(r)} than PGMax per run",
                    }
                )
    if rows:
        pgv = c.get("cases", {}).get("pgmax_env", {})
        tables.append(
            {
                "title": "Ising grid written as a double loop vs PGMax loopy BP "
                "(100 iterations, damping 0.5, float32)",
                "columns": [
                    "grid",
                    "semiring",
                    "ours per run",
                    "PGMax per run",
                    "ours / PGMax",
                    "ours first result",
                    "PGMax first result",
                    "one NumPyro run of the model",
                    "max |marginal diff|",
                    "MAP equal",
                    "iterations to a change < 1e-6, ours / PGMax",
                ],
                "rows": rows,
                "note": "PGMax 0.6.1 on jax 0.4.30 in bench/.pgmax-venv (built by the "
                "bench); first result = compile_model + plan + first infer vs "
                "PGMax's graph build + first run; one NumPyro run = one eager "
                "seeded trace of the same loop-written model (the faster of two), "
                "the floor for anything that runs the user's loop once. Each side "
                "runs in its own process; on the 2-core dev machine a per-run "
                "time moved by 30% and more between processes with the same "
                "compiled program (2026-12-04: ours/PGMax 0.45-0.81x for sum in "
                "one full run, 0.80-1.11x in the next), so read one run's ratio "
                "with that spread"
                + ("" if pgv.get("ok", True) else f"; PGMax: {pgv.get('error')}"),
            }
        )
    rows = []
    chains = [
        (int(k[5:]), d)
        for k, d in cases.items()
        if k.startswith("chain") and k[5:].isdigit() and isinstance(d, dict)
    ]
    if chains:
        n, d = max(chains, key=lambda kd: kd[0])
        heads.append(
            {
                "name": "chain_first_result",
                "value": d.get("first_result_s"),
                "text": f"Chain of {n:,} sites written as a Python loop: "
                f"`compile_model` {fmt_s(d.get('compile_s'))}, first result "
                f"{fmt_s(d.get('first_result_s'))} (one plain NumPyro run of the "
                f"same model: {fmt_s(d.get('numpyro_run_s'))}), then "
                f"{fmt_s(d.get('steady_s'))} per run (tree schedule, all marginals)",
            }
        )
    for key, d in sorted(cases.items()):
        if key.startswith("chain") and isinstance(d, dict):
            rows.append(
                [
                    key[5:],
                    fmt_s(d.get("compile_s")),
                    fmt_s(d.get("first_result_s")),
                    fmt_s(d.get("numpyro_run_s")),
                    fmt_s(d.get("steady_s")),
                    fmt_e(d.get("max_abs_marginal_diff")),
                    d.get("status"),
                ]
            )
    hmm_rows = [
        [
            key[3:],
            fmt_s(d.get("compile_s")),
            fmt_s(d.get("first_result_s")),
            fmt_s(d.get("numpyro_run_s")),
            fmt_s(d.get("steady_s")),
            fmt_e(d.get("max_abs_marginal_diff")),
            d.get("status"),
        ]
        for key, d in sorted(cases.items(), key=lambda kd: kd[0])
        if key.startswith("hmm") and key[3:].isdigit() and isinstance(d, dict)
    ]
    if rows:
        tables.append(
            {
                "title": "Chain written as a Python loop (k=4, float64, tree "
                "schedule) vs a numpy forward-backward",
                "columns": [
                    "sites",
                    "compile_model",
                    "first result",
                    "one NumPyro run of the model",
                    "steady",
                    "max |marginal diff|",
                    "status",
                ],
                "rows": rows,
                "note": "one NumPyro run = one eager seeded trace of the same "
                "loop-written model (the faster of two): the floor for anything "
                "that runs the user's loop once",
            }
        )
    if hmm_rows:
        tables.append(
            {
                "title": "HMM written as a Python loop, observed Categorical "
                "emissions (k=4, m=5, float64, tree schedule) vs a numpy "
                "forward-backward",
                "columns": [
                    "steps",
                    "compile_model",
                    "first result",
                    "one NumPyro run of the model",
                    "steady",
                    "max |marginal diff|",
                    "status",
                ],
                "rows": hmm_rows,
                "note": "one NumPyro run = one eager seeded trace of the same "
                "loop-written model (the faster of two): the floor for anything "
                "that runs the user's loop once",
            }
        )
    rows = []
    drms = [
        (int(k[3:]), d)
        for k, d in cases.items()
        if k.startswith("drm") and k[3:].isdigit() and isinstance(d, dict)
    ]
    for side, d in sorted(drms, key=lambda kd: kd[0]):
        rows.append(
            [
                f"{side}x{side}",
                fmt_s(d.get("first_result_s")),
                fmt_s(d.get("steady_s")),
                fmt_s(d.get("steady_nomap_s")),
                fmt_s(d.get("dcn_steady_s")),
                fmt_x(ratio(d.get("steady_s"), d.get("dcn_steady_s"))),
                fmt_x(ratio(d.get("steady_nomap_s"), d.get("dcn_steady_s"))),
                fmt_x(ratio(d.get("steady_same_job_s"), d.get("dcn_steady_s"))),
                fmt_e(d.get("max_abs_log_score_diff")),
                d.get("status"),
            ]
        )
        if side == 32:
            r = ratio(d.get("steady_s"), d.get("dcn_steady_s"))
            heads.append(
                {
                    "name": "drm32_compiler_vs_dcn",
                    "value": r,
                    "text": "DRM 32x32 (3 levels, batch 64) through the compiler "
                    f"(`compile_model` + `infer(fg, 'max')`): {fmt_x(r)} the "
                    "hand-written DCN-form pass `drm.infer` in steady state "
                    f"({fmt_x(ratio(d.get('steady_nomap_s'), d.get('dcn_steady_s')))}"
                    " without the MAP; "
                    f"{fmt_x(ratio(d.get('steady_same_job_s'), d.get('dcn_steady_s')))}"
                    " for the job `drm.infer` does: MAP, log Z and the class "
                    "posterior, `marginals='c'`), first "
                    "result in "
                    f"{fmt_s(d.get('first_result_s'))}",
                }
            )
    spreads = [
        f"{side}x{side}: " + ", ".join(fmt_x(r) for r in d["ratio_runs"])
        for side, d in sorted(drms, key=lambda kd: kd[0])
        if len(d.get("ratio_runs") or ()) > 1
    ]
    drm_runs_note = (
        ". Each size runs in fresh processes, each timing both side by side "
        "(round-robin, min of each); the row is the process whose ratio is the "
        "median (every ratio, sorted: " + "; ".join(spreads) + ")"
        if spreads
        else ""
    )
    if rows:
        tables.append(
            {
                "title": "DRM (3 levels, batch 64, float32) through the compiler "
                "(`compile_model` + `infer(fg, 'max')`) vs its DCN-form pass",
                "columns": [
                    "image",
                    "compiler first result",
                    "compiler steady",
                    "steady, map=False",
                    "`drm.infer` steady",
                    "ratio",
                    "ratio, map=False",
                    "ratio, `marginals='c'` (MAP, log Z, class posterior)",
                    "max |log score diff|",
                    "status",
                ],
                "rows": rows,
                "note": "ratio: `infer` with every max-marginal, more than `drm.infer` "
                "computes; `marginals='c'` is its job (MAP, log Z, class posterior; "
                "`drm.infer` also returns its per-level messages)" + drm_runs_note,
            }
        )
    mem = []

    def case_order(key: str) -> tuple:
        name = key.rstrip("0123456789")
        return (name, int(key[len(name) :] or 0))

    for key, d in sorted(cases.items(), key=lambda kd: case_order(kd[0])):
        if not isinstance(d, dict) or "peak_rss_mib" not in d:
            continue
        pgs = [
            d[k].get("pgmax_peak_rss_mib")
            for k in ("pgmax_sum", "pgmax_max")
            if isinstance(d.get(k), dict) and d[k].get("pgmax_peak_rss_mib")
        ]
        largest = d.get("largest_table")
        mem.append(
            [
                key,
                f"{d['peak_rss_mib']:.0f} MiB",
                f"{max(pgs):.0f} MiB" if pgs else "-",
                "x".join(map(str, largest)) if largest else "-",
            ]
        )
    if mem:
        tables.append(
            {
                "title": "Peak memory of each case (compiler bench)",
                "columns": [
                    "case",
                    "peak RSS of its process (ours)",
                    "PGMax's process",
                    "largest group table",
                ],
                "rows": mem,
                "note": "peak resident memory of the fresh process that ran the "
                "case (imports, NumPyro references and every timed call "
                "included); for the DRM, the largest factor-group table "
                "(instances x cardinalities)",
            }
        )
    if "f32_max_abs_log_z_diff" in rm:
        tables.append(
            {
                "title": "float32 vs float64: compiled kernel (RM above, sum, "
                "map=False)",
                "columns": [
                    "float32",
                    "float64",
                    "f64 / f32",
                    "float32 run's result dtype",
                    "max |log Z f32 - f64|",
                    "MAP equal",
                ],
                "rows": [
                    [
                        f"{us.get('ours_sum_nomap_f32', float('nan')):.2f} µs/image",
                        f"{us.get('ours_sum_nomap', float('nan')):.2f} µs/image",
                        fmt_x(
                            ratio(
                                us.get("ours_sum_nomap"), us.get("ours_sum_nomap_f32")
                            )
                        ),
                        rm.get("f32_result_dtype"),
                        f"{fmt_e(rm['f32_max_abs_log_z_diff'])} (rel "
                        f"{fmt_e(rm.get('f32_max_rel_log_z_diff'))})",
                        f"{rm.get('f32_map_agreement', float('nan')):.4f}",
                    ]
                ],
                "note": "float32 templates and images, x64 enabled: a float64 result "
                "means the kernel promoted the float32 input",
            }
        )
    return tables, heads


SECTIONS = [
    ("compiler", "Compiled kernel vs NumPyro and PGMax (`bench/bench_compiler.py`)"),
    ("drm", "DRM: DCN-form pass vs a plain DCN, growth, dtypes (`bench/bench_drm.py`)"),
    ("pgmpy", "Exact inference vs pgmpy (`bench/bench_pgmpy.py`)"),
    ("learning", "EM vs Adam (`bench/bench_learning.py`)"),
    ("em_svi", "EM vs SVI (`bench/bench_em_svi.py`)"),
    ("generic", "Generic fit: EM vs Adam vs NumPyro SVI (`bench/bench_generic.py`)"),
]


def render(run: dict, results: Path) -> str:
    quick = run.get("quick", False)
    info = run.get("machine", {})
    who = "make bench QUICK=1" if quick else "make bench"
    if run.get("gpu"):
        who = "bench/gpu.sh" + (" (dry run on CPU, quick sizes)" if quick else "")
    lines = [
        "# Benchmarks"
        + (" — QUICK run (small sizes; not the figures)" if quick else ""),
        "",
        f"Written by `{who}` "
        f"(`bench/run_all.py`) on {run.get('date', '?')}, total "
        f"{run.get('total_s', 0):.0f} s"
        + (
            f" (timeouts scaled by {run['timeout_scale']:g} for a busy machine)"
            if run.get("timeout_scale", 1) != 1
            else ""
        )
        + ". Every ratio is measured side by side in "
        "this one run, on this machine. Benchmarks print ratios; no test asserts a "
        "time.",
        "",
        "## Machine",
        "",
        f"- CPU: {info.get('cpu')}, {info.get('cpu_count')} cores "
        f"({info.get('cores_usable')} usable)",
        f"- JAX device: {info.get('device')} x{info.get('n_devices')} "
        f"(JAX_PLATFORMS={run.get('jax_platforms')})",
        f"- Load: other processes kept {run.get('load_at_start', 0):.2f} cores busy "
        "at the start; per script below."
        + (
            " The machine was not idle: times are inflated and noisy."
            if (run.get("load_max") or 0) > 0.3
            else ""
        ),
        "- Versions: "
        + ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items() if v),
        f"- Python {info.get('python')}",
        "",
    ]
    heads, body = [], []
    for name, title in SECTIONS:
        job = run.get("jobs", {}).get(name)
        path = OUT_DIR / f"{name}.json"
        body += [f"## {title}", ""]
        if job is None:
            body += ["Not run.", ""]
            continue
        load = job.get("other_cores")
        body.append(
            f"*{job['status']}, {job['wall_s']:.0f} s wall"
            + (f", other processes {load:.2f} cores" if load is not None else "")
            + (f"; {job['rerun']}" if job.get("rerun") else "")
            + "*"
        )
        body.append("")
        data = None
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except ValueError:
                data = None
        if data is None:
            body += [
                "No results.",
                "",
                "```",
                job.get("log_tail", "").strip(),
                "```",
                "",
            ]
            continue
        if name == "compiler":
            tables, h = compiler_tables(data)
            png = OUT_DIR / "compiler_scaling.png"
            figures = [str(png)] if png.exists() else []
        else:
            tables, h = data.get("tables", []), data.get("headlines", [])
            figures = data.get("figures", [])
        heads += h
        for t in tables:
            body += [f"### {t['title']}", "", md_table(t["columns"], t["rows"]), ""]
            if t.get("note"):
                body += [t["note"], ""]
        for fig in figures:
            src = Path(fig)
            if src.exists():
                fig_dir = results.parent / "figures"
                fig_dir.mkdir(parents=True, exist_ok=True)
                dst = fig_dir / (("quick_" if quick else "") + src.name)
                shutil.copyfile(src, dst)
                body += [f"![{src.stem}]({dst.relative_to(results.parent)})", ""]
        if job["status"] != "ok" and job.get("log_tail"):
            body += ["Log tail:", "", "```", job["log_tail"].strip(), "```", ""]
    lines += ["## Headlines", ""]
    lines += [f"- {h['text']}" for h in heads if h.get("value") is not None] or [
        "- none"
    ]
    lines += [""] + body
    if GPU_RUNS.exists() and not run.get("gpu"):
        lines += [GPU_RUNS.read_text().strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(run: dict) -> None:
    """Rewrite the README's headline block from this (full) run's page."""
    readme = ROOT / "README.md"
    start, end = "<!-- bench:headlines -->", "<!-- /bench:headlines -->"
    text = readme.read_text()
    if start not in text or end not in text:
        return
    heads = []
    for name, _ in SECTIONS:
        path = OUT_DIR / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        heads += (
            compiler_tables(data)[1]
            if name == "compiler"
            else data.get("headlines", [])
        )
    info = run.get("machine", {})
    block = [
        start,
        f"Headline ratios from [`bench/RESULTS.md`](bench/RESULTS.md), "
        f"{run.get('date')}, {info.get('cpu')} ({info.get('cpu_count')} cores), "
        f"JAX device {info.get('device')}:",
        "",
        *[f"- {h['text']}" for h in heads if h.get("value") is not None],
        end,
    ]
    i, j = text.index(start), text.index(end) + len(end)
    readme.write_text(text[:i] + "\n".join(block) + text[j:])
    say(f"updated the headline block of {readme}")


def _iters_to_tol(run: dict) -> str:
    """Loopy iterations until the largest message change fell below 1e-6, or
    where it stopped when it never did."""
    it = run.get("iters_to_1e-6")
    if it is not None:
        return str(it)
    last = run.get("final_delta")
    return "not in 100" + (f" (last change {last:.2g})" if last is not None else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--render", action="store_true", help="only re-render the page")
    ap.add_argument("--skip", default="", help="comma-separated: jobs, pgmpy, pgmax")
    ap.add_argument("--only", default="", help="comma-separated jobs")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--deadline-s", type=float, default=None)
    ap.add_argument(
        "--timeout-scale",
        type=float,
        default=float(os.environ.get("BENCH_TIMEOUT_SCALE", "1")),
        help="multiply every timeout and the deadline (a busy machine); on the page",
    )
    ap.add_argument(
        "--gpu", action="store_true", help="bench/gpu.sh's set (with --quick: dry run)"
    )
    args = ap.parse_args(argv)
    OUT_DIR.mkdir(exist_ok=True)
    run_file = OUT_DIR / "run.json"
    if args.render:
        run = json.loads(run_file.read_text())
    else:
        skip = set(filter(None, args.skip.split(",")))
        only = set(filter(None, args.only.split(","))) or set(JOBS)
        if args.gpu:
            only &= set(GPU_JOBS)
            skip |= {"pgmpy", "pgmax"}
        default = 170 if args.quick else (280 if args.gpu else 1800)
        deadline = (args.deadline_s or default) * args.timeout_scale
        env = dict(os.environ)
        if not args.gpu:
            env.setdefault("JAX_PLATFORMS", "cpu")
        if args.quick:
            env.setdefault("BENCH_BUILD_VENVS", "0")
        if "pgmax" in skip:
            env["BENCH_SKIP_PGMAX"] = "1"
        if "pgmpy" in skip:
            env["BENCH_SKIP_PGMPY"] = "1"
        t_start = time.monotonic()
        load0 = _other_cores(1.0)
        run = {
            "quick": args.quick,
            "gpu": args.gpu,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "jax_platforms": env.get("JAX_PLATFORMS"),
            "timeout_scale": args.timeout_scale,
            "deadline_s": deadline,
            "machine": machine_info(),
            "load_at_start": load0 or 0.0,
            "jobs": {},
        }
        say(
            f"== run_all ({'quick' if args.quick else 'full'}) on "
            f"{run['machine'].get('device')}; other processes {load0 or 0:.2f} cores"
        )
        for name, (_, _, _, t_quick, t_full) in JOBS.items():
            if name not in only or name in skip:
                continue
            left = deadline - (time.monotonic() - t_start)
            if left < 10:
                run["jobs"][name] = {"status": "skipped (deadline)", "wall_s": 0.0}
                continue
            t_job = t_quick if args.quick else t_full
            if args.gpu and not args.quick:
                t_job = GPU_JOBS[name][1]
            timeout = min(t_job * args.timeout_scale, left)
            run["jobs"][name] = run_job(name, args.quick, timeout, env, args.gpu)
        run["total_s"] = time.monotonic() - t_start
        loads = [j.get("other_cores") for j in run["jobs"].values()]
        run["load_max"] = max([x for x in loads if x is not None] + [load0 or 0.0])
        run_file.write_text(json.dumps(run, indent=1))
    page = render(run, args.results)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(page)
    say(f"wrote {args.results}")
    if not run["quick"] and not run.get("gpu") and args.results == RESULTS:
        update_readme(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
