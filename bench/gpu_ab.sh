#!/usr/bin/env bash
# The full A/B comparison on a GPU host, in one command:
#   bench/gpu_ab.sh            # the default model (SmolLM2-135M), bf16 on cuda
#   MODEL=meta-llama/Llama-3.1-8B-Instruct bench/gpu_ab.sh
# Builds a depth variant (ShortGPT, a quarter of the layers removed) and a sparse one (Wanda 50%)
# on the GPU, evaluates all three, serves them with bf16 weights, runs the serving benchmark's two
# workloads against each variant alone, and writes the A/B report per workload to $OUT.
# Settings (environment): MODEL, DEVICE (cuda), DTYPE (bf16), OUT, PORT, BIN, REMOVE (layers),
# SPARSITY, COMPILE_DECODE (1: compiled decode steps, replayed as CUDA graphs; 0: eager),
# DRY_RUN=1 (print the commands instead of running them).
set -euo pipefail

BIN=${BIN:-.venv/bin}
MODEL=${MODEL:-smollm2-135m}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
OUT=${OUT:-bench/out/gpu_ab}
PORT=${PORT:-8011}
SPARSITY=${SPARSITY:-0.5}
COMPILE_DECODE=${COMPILE_DECODE:-1}
DRY_RUN=${DRY_RUN:-0}
TS="$BIN/trimserve"
URL="http://127.0.0.1:$PORT"

run() {  # echo the command; run it unless DRY_RUN=1
    printf '+ %s\n' "$*"
    if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

if [ "$DRY_RUN" != 1 ] && [ "$DEVICE" = cuda ]; then
    "$BIN/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: install a CUDA build of torch (make setup TORCH=...) or set DEVICE=cpu")'
fi
# The model's checkpoint (an alias is fetched), its depth, and where variants go.
read -r FULL LAYERS VARIANTS SPARSE_PCT < <("$BIN/python" - "$MODEL" "$SPARSITY" <<'PY'
import sys
from transformers import AutoConfig
from variants.load import resolve_model
from variants.store import variants_dir
source = resolve_model(sys.argv[1])
print(source, AutoConfig.from_pretrained(source).num_hidden_layers, variants_dir(), round(100 * float(sys.argv[2])))
PY
)
REMOVE=${REMOVE:-$(((LAYERS + 2) / 4))}  # a quarter of the layers: 8 of 30
TAG=$(basename "$MODEL" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9.\n' '-')
DEPTH_NAME="depth$REMOVE"
SPARSE_NAME="sparse$SPARSE_PCT"
DEPTH="$VARIANTS/$TAG-$DEPTH_NAME"
SPARSE="$VARIANTS/$TAG-$SPARSE_NAME"
mkdir -p "$OUT"
echo "model $MODEL ($LAYERS layers) on $DEVICE/$DTYPE: variants $DEPTH_NAME -> $DEPTH, $SPARSE_NAME -> $SPARSE"

# Calibration as in the pruning benchmarks: 128 windows of 512 C4 tokens.
CALIB=(--calib c4 --nsamples 128 --seqlen 512 --device "$DEVICE")
run "$TS" prune depth "$MODEL" --method shortgpt --remove "$REMOVE" "${CALIB[@]}" --out "$DEPTH"
run "$TS" prune sparse "$MODEL" --method wanda --sparsity "$SPARSITY" "${CALIB[@]}" --out "$SPARSE"

for pair in "full=$FULL" "$DEPTH_NAME=$DEPTH" "$SPARSE_NAME=$SPARSE"; do
    name=${pair%%=*}
    run "$TS" eval "${pair#*=}" --ppl wikitext2 --seqlen 2048 --max-windows 16 --mc pubmedqa \
        --device "$DEVICE" --dtype "$DTYPE" --json "$OUT/eval-$name.json"
done

SERVE=("$TS" serve --host 127.0.0.1 --port "$PORT" --device "$DEVICE" --dtype "$DTYPE" --max-batch-size 16
    --model "full=$FULL" --model "$DEPTH_NAME=$DEPTH" --model "$SPARSE_NAME=$SPARSE")
if [ "$COMPILE_DECODE" = 1 ]; then SERVE+=(--compile-decode); fi
if [ "$DRY_RUN" = 1 ]; then
    run "${SERVE[@]}"
else
    printf '+ %s &\n' "${SERVE[*]}"
    "${SERVE[@]}" &
    SERVER=$!
    trap 'kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
    for _ in $(seq 600); do
        kill -0 "$SERVER" 2>/dev/null || { echo "the server exited before it was ready" >&2; exit 1; }
        "$BIN/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$URL/ready" \
            2>/dev/null && break
        sleep 1
    done
fi

FULL_VARIANT=()  # a hub id has no local checkpoint for the report to read
if [ -d "$FULL" ]; then FULL_VARIANT=(--variant "full=$FULL"); fi

# The serving benchmark's workloads: (a) concurrency 1, 16 requests; (b) concurrency 8, 32 requests;
# ~128-token prompts, 64 greedy output tokens. Each variant is measured alone.
for workload in "a 1 16" "b 8 32"; do
    read -r label concurrency requests <<<"$workload"
    benches=()
    for name in full "$DEPTH_NAME" "$SPARSE_NAME"; do
        run "$TS" bench "$URL" --model "$name" --concurrency "$concurrency" --requests "$requests" \
            --prompt-tokens 128 --output-tokens 64 --json "$OUT/bench-$label-$name.json"
        benches+=(--bench "$OUT/bench-$label-$name.json")
    done
    run "$TS" report "${benches[@]}" --metrics "$URL/metrics" --out "$OUT/report-$label" \
        "${FULL_VARIANT[@]}" --variant "$DEPTH_NAME=$DEPTH" --variant "$SPARSE_NAME=$SPARSE" \
        --eval "full=$OUT/eval-full.json" --eval "$DEPTH_NAME=$OUT/eval-$DEPTH_NAME.json" \
        --eval "$SPARSE_NAME=$OUT/eval-$SPARSE_NAME.json"
done
echo "reports: $OUT/report-a/report.md, $OUT/report-b/report.md"
