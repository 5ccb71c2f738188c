#!/usr/bin/env bash
# Validate single-GPU plans of Llama-3.2-1B (micro-batch x recompute, at three sequence lengths) on one CUDA GPU:
# `paraplan validate --nproc 1 --device cuda` per sequence length, each profiling the GPU, running every plan and
# comparing predicted with measured step time and peak memory. Each validation's folder is packed into
# OUT/seqN.tar.gz (report.md, runs.json, profile.json, validation.json, run logs).
#
#   benchmarks/gpu_validation.sh OUT [SECONDS] [GPU_PRESET] [SEQ/MBS/RECOMPUTE ...]
#
# e.g. 2048/2,4/none,full validates micro-batches 2 and 4, each without and with full recompute, at 2048 tokens.
# SECONDS (default 420) bounds the whole script: each validation gets what is left, and one stopped at its limit
# keeps the runs it measured in its runs.json (`paraplan validate --runs` compares them later).
set -uo pipefail
out=${1:?usage: gpu_validation.sh OUT [SECONDS] [GPU_PRESET] [SEQ/MBS/RECOMPUTE ...]}
budget=${2:-420}
gpu=${3:-h200}
grids=("${@:4}")
(( ${#grids[@]} )) || grids=(1024/1,2,4,8/none,selective,full 2048/1,2,4/none,selective,full 4096/1,2/none,selective,full)
deadline=$(( $(date +%s) + budget ))
paraplan=(python3 -c "import sys; sys.argv[0] = 'paraplan'; from api.cli import main; main()")
mkdir -p "$out"

validate() {  # seq_len mbs-list recompute-list
    local seq=$1 mbs=$2 recompute=$3 left=$(( deadline - $(date +%s) - 15 ))
    if (( left < 30 )); then echo "seq $seq: skipped, ${left}s left"; return; fi
    local dir=/tmp/gpu-validation/seq$seq
    rm -rf "$dir"
    echo "=== seq $seq: mbs $mbs, recompute $recompute, up to ${left}s ($(date -u +%T))"
    timeout -s TERM -k 20 "$left" "${paraplan[@]}" validate --nproc 1 --device cuda --gpu "$gpu" \
        --model llama3.2-1b --seq-len "$seq" --global-batch 8 --mbs "$mbs" --recompute "$recompute" \
        --steps "${STEPS:-20}" --warm-steps "${WARM_STEPS:-4}" --confirm 0 --no-store --out "$dir" --json
    echo "=== seq $seq: exit $? ($(date -u +%T))"
    tar -czf "$out/seq$seq.tar.gz" -C "$dir" --exclude='checkpoints' . 2>/dev/null
}

for grid in "${grids[@]}"; do
    IFS=/ read -r seq mbs recompute <<<"$grid"
    validate "$seq" "$mbs" "$recompute"
done
