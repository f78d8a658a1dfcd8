#!/usr/bin/env bash
# The measurements recorded in docs/gpu-h200.md, run through the device tool on nvidia-h200-x2:
#   bash benchmarks/gpu/h200_suite.sh PHASE...   (phases: info varlen run7b run13b mem7b mem13b peer13b)
# Everything lands in $OUT (logs, result.json copies, memory_check.jsonl).
set -uo pipefail
cd "$(dirname "$0")/../.."
bash benchmarks/gpu/setup_device.sh || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export ACCELBENCH_CACHE=/tmp/abcache
NPROC=$(nvidia-smi -L | wc -l)
keep() { mkdir -p "$OUT/$2"; cp "$1"/result.json "$1"/report.md "$1"/events.jsonl "$OUT/$2/" 2>/dev/null; }
for phase in "$@"; do
  echo "=== $phase ($(date +%T))"
  case $phase in
    info)
      python3 -m accelbench backends | tee "$OUT/backends.txt"
      python3 -m accelbench info | tee "$OUT/info.txt"
      python3 -m accelbench info --json > "$OUT/info.json"
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/info.txt" ;;
    run7b)
      timeout 420 python3 -m accelbench run --case llava1.5-7b --nproc-per-node "$NPROC" --steps 12 --no-eval --out /tmp/r7b \
        2>&1 | grep -v "INFO" | tail -40; keep /tmp/r7b run7b ;;
    run13b)
      timeout 500 python3 -m accelbench run --case llava1.5-13b --nproc-per-node "$NPROC" --steps 12 --no-eval --out /tmp/r13b \
        2>&1 | grep -v "INFO" | tail -40; keep /tmp/r13b run13b ;;
    varlen)
      python3 benchmarks/gpu/check_varlen.py 2>&1 | tail -3 ;;
    peer13b)
      for stage in finetune pretrain; do
        timeout 280 python3 benchmarks/gpu/compare_peer.py --case llava1.5-13b --stage "$stage" --steps 10 \
          --nproc "$NPROC" --out "/tmp/peer13b-$stage" --json "$OUT/peer13b-$stage.json" 2>&1 | grep -v INFO | tail -14
      done ;;
    mem7b|mem13b)
      case=llava1.5-${phase#mem}
      if [ "$phase" = mem7b ]; then fmbs="8 16"; else fmbs="4 8"; fi
      timeout 200 python3 -m torch.distributed.run --nproc-per-node "$NPROC" benchmarks/gpu/memory_check.py \
        --case "$case" --stage pretrain --mbs 16 32 --seq 2048 2>&1 | grep -v INFO | grep -E '^\{|Error|error' | tail -5
      timeout 200 python3 -m torch.distributed.run --nproc-per-node "$NPROC" benchmarks/gpu/memory_check.py \
        --case "$case" --stage finetune --mbs $fmbs --seq 2048 2>&1 | grep -v INFO | grep -E '^\{|Error|error' | tail -5 ;;
  esac
done
echo "=== done ($(date +%T))"
