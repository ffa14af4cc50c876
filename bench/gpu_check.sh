#!/usr/bin/env bash
# GPU check, about 5 minutes on one CUDA GPU: cuDNN LSTM training chars/s in fp32 and bf16,
# sampling chars/s (batch 1 streamed, batch 32), and the val loss of a 3-minute default run on
# tiny Shakespeare. Run from a checkout with torch (CUDA build) and textrnn installed:
#     bash bench/gpu_check.sh [path/to/tinyshakespeare.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
DATA=${1:-../shared/data/tinyshakespeare.txt}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

$PY -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)'
$PY -m textrnn preprocess "$DATA" --out "$WORK/data"

for precision in fp32 bf16; do
  $PY -m textrnn train "$WORK/data" --out "$WORK/speed-$precision" --device cuda --precision "$precision" \
      --layers 2 --hidden 512 --batch-size 64 --max-steps 150 --eval-every 100000 2>/dev/null
  $PY - "$WORK/speed-$precision" "$precision" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"train"' in l]
speeds = [r["chars_per_sec"] for r in rows[2:]] or [r["chars_per_sec"] for r in rows]
print(f"training 2x512 LSTM, batch 64 x 128, {sys.argv[2]}: {statistics.median(speeds):,.0f} chars/s")
PYEOF
done

$PY - "$WORK/speed-fp32" <<'PYEOF'
import sys, time
from textrnn import Sampler
sampler = Sampler.from_checkpoint(sys.argv[1], device="cuda")
sampler.generate("ROMEO:", length=50, seed=0)
start = time.perf_counter(); text = "".join(sampler.stream("ROMEO:", length=2000, seed=1))
print(f"sampling batch 1 streamed: {len(text) / (time.perf_counter() - start):,.0f} chars/s")
start = time.perf_counter(); texts = sampler.generate("ROMEO:", length=1000, num_samples=32, seed=1)
print(f"sampling batch 32: {sum(map(len, texts)) / (time.perf_counter() - start):,.0f} chars/s")
PYEOF

$PY -m textrnn train "$WORK/data" --out "$WORK/quality" --device cuda --max-time 3m --eval-every 500 2>/dev/null
$PY -m textrnn info "$WORK/quality" | grep -E "best val|progress"
