#!/usr/bin/env bash
# The one prepared GPU run: every step of benchmarks/gpu_run.py in order of value, each under
# its own timeout, figures in RESULTS_DIR/figures.jsonl as they are measured, the output of
# every step in RESULTS_DIR/log.txt. A step that fails or runs out of time is logged and the
# next one starts; the exit status is the number of steps that did not finish.
#
#   bash benchmarks/gpu_run.sh RESULTS_DIR               # on the GPU box: <= 9 minutes
#   bash benchmarks/gpu_run.sh RESULTS_DIR --rehearsal   # here, on the CPU, tiny model
#
# GPU_RUN_STEPS="http cost" runs only the steps named (to rerun what did not finish);
# GPU_RUN_VARIANTS="eager half_group_norm fused_dconv": only those of the model step (compiled
# comes first).
# PYTHON picks the interpreter (default python3; on the GPU box with the offline bundle:
# PYTHONPATH=/tmp/site:$PWD, see benchmarks/offline_bundle.sh).
set -u
cd "$(dirname "$0")/.."
results=${1:?usage: gpu_run.sh RESULTS_DIR [--rehearsal]}
shift
mkdir -p "$results"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# step and its timeout in seconds: 15 + 60 + 195 + 150 + 15 + 60 + 40 = 535 s, under 9 minutes
steps=("machine 15" "correctness 60" "model 195" "http 150" "cost 15" "batch 60" "roformer 40")
unfinished=0
for entry in "${steps[@]}"; do
    read -r step limit <<< "$entry"
    # GPU_RUN_STEPS="http cost": only those (a rerun of what did not finish)
    if [ -n "${GPU_RUN_STEPS:-}" ] && [[ " $GPU_RUN_STEPS " != *" $step "* ]]; then continue; fi
    echo "== $step (at most ${limit} s) $(date -u +%H:%M:%S)" | tee -a "$results/log.txt"
    timeout -k 5 "$limit" "$PYTHON" -m benchmarks.gpu_run "$step" --results "$results" "$@" \
        >> "$results/log.txt" 2>&1
    status=$?
    echo "== $step: exit $status $(date -u +%H:%M:%S)" | tee -a "$results/log.txt"
    [ "$status" -eq 0 ] || unfinished=$((unfinished + 1))
done
echo "figures: $results/figures.jsonl ($(wc -l < "$results/figures.jsonl" 2>/dev/null || echo 0) lines)"
exit "$unfinished"
