#!/usr/bin/env bash
# Issue 13's GPU measurements in one command, for a session lent a GPU (the `device` tool: one
# command of at most 10 min, 15 min of device time a session, the machine's start included).
# Run it once, from the repo root, on the device machine:
#
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#   device run:  bash bench/gpu_check.sh        (carry: [".whl"], timeout_s: 560)
#
# The device image has torch (CUDA), transformers, huggingface_hub, pyarrow, fsspec, scipy and pytest
# but not diffusers: the two wheels above (6 MB) are installed into /tmp/site. Ray and faiss-gpu are
# not carried (the Ray wheel alone is over the 64 MiB a call carries), so bench_match's GPU check is
# not here. Everything printed is also written to $OUT/<step>.txt (one file per step: 8, the most that come
# back). Each step has its own time limit, so one slow step cannot take the others' results with it;
# the limits add up to 520 s. DEVICE=cpu and SMALL=1 run the same steps in seconds on a CPU (the
# dry run that checks this script before device time is spent on it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_DISABLE_PROGRESS_BARS=1 DIFFUSERS_VERBOSITY=error \
  TRANSFORMERS_VERBOSITY=error
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "could not install the carried wheels in .whl/"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
PY=${PYTHON:-python3}

# sizes: the issue's (500 samples a prompt, 50 steps); SMALL=1: a few seconds each, for the dry run
# (REP: repeats of the UNet-only steps; the sampler steps alternate their methods twice)
if [ "${SMALL:-0}" = 1 ]; then N=4 STEPS=2 BATCH=2 SD_BATCH=1 REP=1 SREP=1
else N=500 STEPS=50 BATCH=64 SD_BATCH=8 REP=3 SREP=2; fi

step() {  # step <name> <seconds> <command...>: run it under a limit, print and keep its output
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$name.txt"
  local t0=$SECONDS
  (cd bench && timeout "$limit" "$@") 2>&1 | tee -a "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
}

{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/env.txt"

# 1. the GPU-marked test (the filter's pairwise tiled l2 on the GPU equals the CPU's)
#    (addopts cleared: pyproject's -n 2 needs pytest-xdist, which the device image may not have)
step gpu_test 40 $PY -m pytest -q -o addopts= -p no:cacheprovider -m gpu ../tests/test_distances.py
# 2. the UNet alone, as loaded vs channels_last, bf16 and (on CUDA) fp16, on the demo model's batch shape
#    and on the SD 1.x layout's (torch.compile last, in step 5: its first call can take minutes)
NOCOMPILE=cl,bf16$([ "$DEVICE" = cpu ] || echo ,fp16,fp16+cl)
step unet_demo 50 $PY bench_sampler.py --mode unet --device "$DEVICE" --batch "$BATCH" --repeats "$REP" --threads 8 \
  --variants "$NOCOMPILE"
step unet_sd15 50 $PY bench_sampler.py --mode unet --tiny sd15 --device "$DEVICE" --batch "$SD_BATCH" --repeats "$REP" \
  --threads 8 --variants "$NOCOMPILE"
# 3. the sampler against the plain loop and the UNet-only bound at 500 samples a prompt: the demo
#    model (float32, then float16 as audits run on GPUs; bfloat16 on the CPU dry run)
HALF=$([ "$DEVICE" = cpu ] && echo bfloat16 || echo float16)
step sampler_demo_fp32 90 $PY bench_sampler.py --prompts 1 --samples "$N" --steps "$STEPS" --batch "$BATCH" \
  --repeats "$SREP" --threads 8 --device "$DEVICE" --channels-last
step sampler_demo_half 90 $PY bench_sampler.py --prompts 1 --samples "$N" --steps "$STEPS" --batch "$BATCH" \
  --repeats "$SREP" --threads 8 --device "$DEVICE" --channels-last --dtype "$HALF"
# 4. the SD 1.x layout at 512 px with the scheduler it ships (PNDM), half precision on the GPU
step sampler_sd15 120 $PY bench_sampler.py --tiny sd15 --prompts 1 --samples "$N" --steps "$STEPS" \
  --batch "$((BATCH / 2))" --repeats "$SREP" --threads 8 --device "$DEVICE" \
  --dtype "$([ "$DEVICE" = cpu ] && echo float32 || echo float16)"
# 5. torch.compile of the demo UNet (inductor; on CUDA its CUDA graphs may matter for a UNet this small)
[ "${SMALL:-0}" = 1 ] || step unet_demo_compile 80 $PY bench_sampler.py --mode unet --device "$DEVICE" \
  --batch "$BATCH" --repeats "$REP" --threads 8 --variants compile,cl+compile
echo "results in $OUT"
