#!/usr/bin/env bash
# The project's checks on a lent GPU, one call of the device tool (docs/PERFORMANCE.md, "GPU"):
#   bash eval/gpu_check.sh OUT_DIR
# It runs under the device image's python3 (jax CUDA, flax, transformers, torch already there) from
# the checkout (PYTHONPATH, no install). Phase A runs four programs at once, none preallocating GPU
# memory: the demo, the MVTec program with random ViT-L/14-336 in float32 and in bfloat16 on the
# embedded demo set, and the tower parity tests (JAX on the GPU against transformers on the CPU).
# Phase B times the GPU table alone on the GPU: bfloat16, then float32, torch's tower beside each.
# Every step has its own time limit; the log, the bench JSONs and the runs' results come back
# under OUT_DIR. The limits add up to 540 s (180 + 140 + 220): give the device call 590 s
# (2026-12-04: the bf16 table took 98 s, float32 compiles slowly and did not finish B = 16 in 130 s).
set -u
OUT_DIR=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/log.txt"
RUNS=/tmp/gpu_runs
mkdir -p "$RUNS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEMO=fiseclip_jax/data/demo

say() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
step() {   # step NAME SECONDS CMD...: its output in $RUNS/NAME.log, its exit status in the log
  local name=$1 secs=$2; shift 2
  say "start $name: $*"
  timeout "$secs" "$@" > "$RUNS/$name.log" 2>&1
  local rc=$?
  say "end $name rc=$rc"
  tail -n 30 "$RUNS/$name.log" | sed "s/^/[$name] /" >> "$LOG"
}

say "environment"
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  python3 -c "import sys, jax, flax, transformers, torch; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available()); print(jax.devices())"
} >> "$LOG" 2>&1

say "phase A"
(
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  step demo 180 python3 -m eval.demo --platform gpu --out "$RUNS/demo" &
  step vitl_f32 180 python3 -m eval.mvtec --platform gpu --data_root "$DEMO" --random_weights \
      --model vit_l14_336 --batch_size 8 --compute_dtype float32 --out "$RUNS/vitl_f32" \
      --overwrite --noreport &
  step vitl_bf16 180 python3 -m eval.mvtec --platform gpu --data_root "$DEMO" --random_weights \
      --model vit_l14_336 --batch_size 8 --compute_dtype bfloat16 --out "$RUNS/vitl_bf16" \
      --overwrite --noreport &
  step parity 180 python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 150 -rfE --tb=short tests/test_clip.py \
      tests/test_dinov2.py tests/test_attention.py tests/test_precision.py tests/test_clip_full.py &
  wait
)
(cd "$RUNS" && tar czf "$OUT_DIR/runs.tar.gz" --exclude='*.png' --exclude='report' --exclude='maps' \
    --exclude='curves' ./*.log demo vitl_f32 vitl_bf16 2>/dev/null)

say "phase B"
step bench_bf16 140 python3 -m eval.bench --platform gpu --batch_sizes 2,16,64 --dtypes bfloat16 \
    --stages encoder,end_to_end --repeats 10 --nometrics_bench --out "$OUT_DIR/bench_bf16.json"
step bench_f32 220 python3 -m eval.bench --platform gpu --batch_sizes 2,16,64 --dtypes float32 \
    --stages encoder,end_to_end --repeats 5 --nometrics_bench --out "$OUT_DIR/bench_f32.json"
cp "$RUNS"/bench_*.log "$OUT_DIR/" 2>/dev/null
nvidia-smi --query-gpu=clocks.sm,memory.used --format=csv >> "$LOG" 2>&1
say "done"
