#!/usr/bin/env bash
# The measurements recorded in docs/gpu-h200.md, docs/performance.md and docs/performance-history.md, run through
# the device tool:
#   bash benchmarks/gpu/h200_suite.sh PHASE...
# phases: info nccl gemm saves hostlink varlen liger run7b run13b mem7b mem13b auto7b prof-CASE-STAGE (e.g. prof-13b-finetune)
#         peer-CASE-STAGE (e.g. peer-13b-pretrain, peer-13b-finetune, peer-7b-finetune) and
#         fixed-CASE-STAGE (every sample 1024 tokens, 576 of them image tokens)
# ABLATE=lever,lever adds one accelbench run per lever without it (peer-/fixed- phases); VARIANTS='OPTIONS;OPTIONS'
# one accelbench run per set of extra options (e.g. VARIANTS='--offload 6;--offload 10'); NO_PEER=1 skips the
# peer; NO_ACCELBENCH=1 runs the peer alone, PEER_ATTN=eager and PEER_OPTIM=adamw_torch its rounding variants
# (compare_peer.py --peer-attn/--peer-optim); STEPS (default 10); MBS (peer-/fixed- phases: micro-batch per GPU,
# default the stage's LLaVA value);
# REPEATS (peer-/fixed- phases: runs of each path, interleaved; with NO_PEER=1 of accelbench; ablations run once;
# default 1);
# PROF_STEPS (prof- phases, default 5: steps 3-4 profiled, the later ones not);
# PHASE_TIMEOUT and PATH_TIMEOUT (seconds per phase and per path); TAG names the outputs of prof-, peer- and
# fixed- phases that differ by their environment (e.g. TAG=nccl8 NCCL_MAX_NCHANNELS=8 ...), so that two suite runs
# in one call keep both.
# PHASE@NAME (prof-, peer-, fixed- phases) merges benchmarks/gpu/ds/NAME.json over the DeepSpeed config of
# every path in it (accelbench run --ds-config), e.g. prof-13b-finetune@zero3-prefetch.
# Everything lands in $OUT (logs, result.json copies, the comparison JSON) as results.tgz; the prof- phases'
# slimmed traces (benchmarks/gpu/slim_trace.py) come back beside it as LABEL.trace.json.gz.
set -uo pipefail
cd "$(dirname "$0")/../.."
bash benchmarks/gpu/setup_device.sh || exit 1
rm -rf /tmp/slim  # slimmed traces of this run only (an earlier run in the call moved its own to $OUT)
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export ACCELBENCH_CACHE=/tmp/abcache
NPROC=$(nvidia-smi -L | wc -l)
STEPS=${STEPS:-10}
WITHOUT=${WITHOUT:-}  # set by the liger phase when the fused kernels are unusable here
keep() { mkdir -p "$OUT/$2"; cp "$1"/result.json "$1"/report.md "$1"/events.jsonl "$OUT/$2/" 2>/dev/null; cp -r "$1"/failures "$1"/hang "$OUT/$2/" 2>/dev/null; }
for arg in "$@"; do
  phase=${arg%@*}; tuned=(); label=$phase${TAG:+-$TAG}
  if [ "$arg" != "$phase" ]; then tuned=(--ds-config "benchmarks/gpu/ds/${arg#*@}.json"); label=$label-${arg#*@}; fi
  echo "=== $arg ($(date +%T))"
  case $phase in
    info)
      python3 -m accelbench backends | tee "$OUT/backends.txt"
      python3 -m accelbench info | tee "$OUT/info.txt"
      python3 -m accelbench info --json > "$OUT/info.json"
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/info.txt" ;;
    liger)
      timeout 120 python3 benchmarks/gpu/check_liger.py > "$OUT/liger.txt" 2>&1 || WITHOUT=${WITHOUT:+$WITHOUT,}fused-kernels
      grep -v "Backend impl" "$OUT/liger.txt" | tail -2 ;;
    run7b|run13b)
      timeout 500 python3 -m accelbench run --case "llava1.5-${phase#run}" --nproc-per-node "$NPROC" --steps 12 \
        --no-eval --out "/tmp/$phase" ${WITHOUT:+--without $WITHOUT} 2>&1 | grep -v "INFO" | tail -40
      keep "/tmp/$phase" "$phase" ;;
    auto7b)  # the memory issue: the --mbs auto choice must run without running out of memory
      timeout 190 python3 -m accelbench run --case llava1.5-7b --stages finetune --mbs auto --nproc-per-node "$NPROC" \
        --steps 3 --no-eval --hang-timeout 120 --out /tmp/auto7b ${WITHOUT:+--without $WITHOUT} 2>&1 | grep -v "INFO" | tail -12
      keep /tmp/auto7b auto7b ;;
    nccl)  # the interconnect: topology, NCCL's transport, and collective bandwidth with nothing beside it
      nvidia-smi topo -m | tee "$OUT/topo.txt"
      NCCL_DEBUG=INFO timeout 120 python3 -m torch.distributed.run --nproc-per-node "$NPROC" benchmarks/gpu/nccl_bw.py \
        > "$OUT/nccl_bw.log" 2>&1
      grep "^{" "$OUT/nccl_bw.log"
      grep -o "NCCL INFO Channel .* via .*" "$OUT/nccl_bw.log" | sed 's/Channel [0-9/]* : //' | sort | uniq -c
      echo "with NCCL_PROTO=Simple:"  # NCCL's protocol choice against its bulk-transfer protocol
      NCCL_PROTO=Simple timeout 120 python3 -m torch.distributed.run --nproc-per-node "$NPROC" benchmarks/gpu/nccl_bw.py \
        2>&1 | grep "^{" | tee "$OUT/nccl_bw_simple.log" ;;
    gemm)  # one decoder layer's GEMMs alone: the ceiling of a step's GEMM time
      timeout 120 python3 benchmarks/gpu/gemm_tflops.py | tee "$OUT/gemm_tflops.jsonl" ;;
    saves)  # what one compiled decoder layer saves for its backward, against the memory model (7B widths)
      timeout 300 python3 benchmarks/gpu/layer_saves.py | tee "$OUT/layer_saves.jsonl" ;;
    hostlink)  # pinned copies to and from the host, alone and beside GEMMs (lever offload-activations)
      timeout 120 python3 benchmarks/gpu/host_link.py | tee "$OUT/host_link.jsonl" ;;
    varlen)
      python3 benchmarks/gpu/check_varlen.py 2>&1 | tail -3 ;;
    prof-*)  # e.g. prof-13b-finetune: torch.profiler over steps 3-4, summaries to $OUT/prof-.../
      IFS=- read -r _ size stage <<< "$phase"
      timeout "${PHASE_TIMEOUT:-400}" python3 -m accelbench run --case "llava1.5-$size" --stages "$stage" \
        --nproc-per-node "$NPROC" --steps "${PROF_STEPS:-5}" --profile 3-4 --no-eval --out "/tmp/$label" "${tuned[@]}" \
        ${WITHOUT:+--without $WITHOUT} 2>&1 | grep -v "INFO\|Backend impl" | tail -8
      keep "/tmp/$label" "$label"; cp "/tmp/$label/$stage/profile/summary."* "$OUT/$label/" 2>/dev/null
      # the trace, cut to what the timeline analysis reads, comes back beside the archive (16 MiB a file)
      trace=/tmp/$label/$stage/profile/trace.json.gz
      [ -f "$trace" ] && mkdir -p /tmp/slim && python3 benchmarks/gpu/slim_trace.py "$trace" \
        "/tmp/slim/$label.trace.json.gz" && ls -la "/tmp/slim/$label.trace.json.gz"
      cat "$OUT/$label/summary.json" 2>/dev/null ;;
    peer-*|fixed-*)
      IFS=- read -r kind size stage <<< "$phase"
      fixed=(); [ "$kind" = fixed ] && fixed=(--fixed-len 1024)
      timeout "${PHASE_TIMEOUT:-400}" python3 benchmarks/gpu/compare_peer.py --case "llava1.5-$size" --stage "$stage" \
        --path-timeout "${PATH_TIMEOUT:-$(( ${PHASE_TIMEOUT:-400} / 2 - 10 ))}" \
        --steps "$STEPS" --nproc "$NPROC" ${MBS:+--mbs "$MBS"} ${REPEATS:+--repeats "$REPEATS"} "${fixed[@]}" "${tuned[@]}" --out "/tmp/$label" --json "$OUT/$label.json" \
        ${WITHOUT:+--without $WITHOUT} ${ABLATE:+--ablate $ABLATE} ${VARIANTS:+--variants "$VARIANTS"} ${NO_PEER:+--no-peer} \
        ${NO_ACCELBENCH:+--no-accelbench} ${PEER_ATTN:+--peer-attn $PEER_ATTN} ${PEER_OPTIM:+--peer-optim $PEER_OPTIM} \
        2>&1 | grep -v INFO | tail -24
      for e in /tmp/"$label"/*/run/events.jsonl; do  # per-step times of every path
        [ -f "$e" ] && cp "$e" "$OUT/$label.$(basename "$(dirname "$(dirname "$e")")").events.jsonl"
      done
      grep -h -A4 "Recompiling" /tmp/"$label"/*/log.txt 2>/dev/null | head -30 ;;  # with TORCH_LOGS=recompiles
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
# the device tool brings back at most 8 files: everything in one archive. An earlier suite run in the same call
# left its own archive: its files join this one, renamed earlier-NAME where this run wrote the same name.
cd "$OUT" || exit 1
if [ -f results.tgz ]; then
  earlier=$(mktemp -d) && tar -xzf results.tgz -C "$earlier" && rm results.tgz
  (cd "$earlier" && find . -type f) | while read -r f; do
    dest=$f; [ -e "$dest" ] && dest="$(dirname "$f")/earlier-$(basename "$f")"
    mkdir -p "$(dirname "$dest")" && mv "$earlier/$f" "$dest"
  done
fi
tar -czf /tmp/results.tgz --exclude='*.trace.json.gz' . && find . -mindepth 1 -maxdepth 1 ! -name '*.trace.json.gz' \
  -exec rm -rf {} + && mv /tmp/results.tgz .
for f in /tmp/slim/*.trace.json.gz; do  # an earlier run's trace of the same name stays, as earlier-NAME
  [ -f "$f" ] || continue
  [ -e "$(basename "$f")" ] && mv "$(basename "$f")" "earlier-$(basename "$f")"
  mv "$f" .
done
