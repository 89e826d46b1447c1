#!/usr/bin/env bash
# The benchmarks on a GPU machine without network access, in under 5 minutes.
#
# The GPU image has jax with CUDA, numpyro 0.21, networkx and optax, but no funsor
# and no arviz. funsor is carried as wheels (pure Python: funsor, makefun, typing_extensions,
# multipledispatch, opt_einsum), because compile_model and enumerate_exact need
# numpyro.contrib.funsor; nothing run here imports arviz. Skipped there: pgmpy and
# PGMax (each needs a venv built from the package index) and the compiler's
# chain/Ising/DRM cases (CPU-bound compilation, see bench_compiler.py).
#
#   bash bench/gpu.sh --prepare   # once, on a machine with network: bench/wheels/
#   bash bench/gpu.sh             # on the GPU machine (carry bench/wheels/)
#   BENCH_GPU_DRY_RUN=1 bash bench/gpu.sh   # the same on CPU, quick sizes
#
# Then bench/probe_dcn_parts.py splits the DRM pass's time beside a plain forward
# into its parts (issue 14's GPU gap), into $BENCH_OUT_DIR/probe_dcn_parts.txt.
# Prints the page (figures with the device name) and writes it to
# ${BENCH_GPU_RESULTS:-bench/out/gpu/RESULTS.md} (and $OUT/ when set). Record the
# figures of a real run, with the date, in bench/gpu_runs.md (RESULTS.md quotes it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=bench/wheels
SITE=bench/.gpu-site
CARRIED="funsor==0.4.8 makefun==1.16.0 multipledispatch==1.0.0 opt_einsum==3.4.0 typing_extensions==4.16.0"

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -n "${BENCH_GPU_DRY_RUN:-}" && -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" $CARRIED
    ls -l "$WHEELS"
    exit 0
fi

# Unpack the carried wheels for what the image lacks (pure-Python wheels are zips).
mkdir -p "$SITE"
"$PY" - "$WHEELS" "$SITE" <<'PYEOF'
import importlib.util, pathlib, sys, zipfile
wheels, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for mod in ("funsor", "makefun", "multipledispatch", "opt_einsum", "typing_extensions"):
    if importlib.util.find_spec(mod) is not None:
        continue
    found = sorted(wheels.glob(f"{mod}-*.whl"))
    if not found:
        print(f"gpu.sh: {mod} missing and no wheel in {wheels} (run --prepare)")
        continue
    zipfile.ZipFile(found[-1]).extractall(site)
    print(f"gpu.sh: {mod} from {found[-1].name}")
PYEOF
export PYTHONPATH="$ROOT:$ROOT/$SITE${PYTHONPATH:+:$PYTHONPATH}"

ARGS=(--gpu --results "${BENCH_GPU_RESULTS:-bench/out/gpu/RESULTS.md}")
if [[ -n "${BENCH_GPU_DRY_RUN:-}" ]]; then
    export JAX_PLATFORMS=cpu
    ARGS+=(--quick)
else
    export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi
# Raw JSON, logs and plots go to bench/out/gpu/ (BENCH_OUT_DIR), never over the CPU
# run's bench/out/ that RESULTS.md is rendered from.
export BENCH_OUT_DIR="$ROOT/bench/out/gpu"
mkdir -p "$BENCH_OUT_DIR"
"$PY" -c "import jax; d = jax.devices()[0]; print('device:', d.platform, d.device_kind, 'x', len(jax.devices()), '| jax', jax.__version__)"
timeout 290 "$PY" bench/run_all.py "${ARGS[@]}" || echo "gpu.sh: run_all exited $?"
# Where the DRM pass's time goes beside the plain forward (issue 14), part by part.
PROBE_ARGS=()
[[ -n "${BENCH_GPU_DRY_RUN:-}" ]] && PROBE_ARGS+=(--quick)
timeout 100 "$PY" bench/probe_dcn_parts.py ${PROBE_ARGS[@]+"${PROBE_ARGS[@]}"} \
    > "$BENCH_OUT_DIR/probe_dcn_parts.txt" 2>&1 || echo "gpu.sh: probe_dcn_parts exited $?"
RES=${BENCH_GPU_RESULTS:-bench/out/gpu/RESULTS.md}
if [[ -f "$RES" ]]; then
    cat "$RES"
    cat "$BENCH_OUT_DIR/probe_dcn_parts.txt" 2>/dev/null || true
    if [[ -n "${OUT:-}" ]]; then
        # Two files back: the page, and one archive of its figures and raw JSON/logs.
        cp "$RES" "$OUT"/
        cp "$BENCH_OUT_DIR/probe_dcn_parts.txt" "$OUT"/ 2>/dev/null || true
        tar -czf "$OUT/gpu_raw.tar.gz" -C "$BENCH_OUT_DIR" . 2>/dev/null || true
    fi
fi
