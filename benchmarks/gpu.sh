#!/usr/bin/env bash
# The GPU benchmark: one prepared command, about 8 minutes on one H200 (each half under 4), printing one JSON object.
#
#   benchmarks/gpu.sh          # CUDA: encode with DINOv2-B/reg4 shapes at fp32 (TF32; bf16 beside it, with
#                              #       its error against fp32) on photo-like 500x375 JPEG shards: the three
#                              #       decode paths (per core; nvjpeg on the device), the whole path per decode
#                              #       path vs the forward alone (MFU; compiled beside eager), the write
#                              #       candidates; 1 and 3 worker processes (encode parts: 4 minutes at most);
#                              #       flow training at the paper config's width on random codes, eager and
#                              #       torch.compiled (fused AdamW, MFU), every sampler (naive, KV cache with
#                              #       one and two CFG passes, static cache, CUDA graphs, Jacobi) at a
#                              #       paper-like width fitted briefly to AR(1) codes, and seconds for 50k
#                              #       samples at the best batch size (train + sample parts: 4 minutes at most)
#   benchmarks/gpu.sh encode   # only the encode parts (issue #14's device check, ~4 minutes)
#   benchmarks/gpu.sh train    # only the train_flow and sample parts (issue #15's device check, ~4 minutes)
#   benchmarks/gpu.sh rehearse # only `srcflow rehearse` of configs/imagenet256.yaml with random weights on one GPU
#                              #       (issue #24's device check, 5 minutes at most): every stage at paper shapes,
#                              #       its peak device memory and seconds beside the plan's (not part of `all`)
#   benchmarks/gpu.sh --cpu    # the same scripts at smoke size on CPU (CI runs this; the rehearsal of the smoke
#                              #       config with the fewest images it takes)
#
# Each part also lands as JSON in $SRCFLOW_BENCH_OUT (default: benchmarks/results on CUDA, a temp dir
# with --cpu), where `srcflow plan` reads measured throughputs from.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

mode=cuda parts=all
[ "${1:-}" = "--cpu" ] && mode=cpu
[ "${1:-}" = "train" ] && parts=train
[ "${1:-}" = "encode" ] && parts=encode
[ "${1:-}" = "rehearse" ] && parts=rehearse
if [ "$mode" = cpu ]; then out=${SRCFLOW_BENCH_OUT:-$(mktemp -d)}; else out=${SRCFLOW_BENCH_OUT:-benchmarks/results}; fi
mkdir -p "$out"

run() {  # name, limit (s), command...: a part that fails or times out is recorded, not fatal
  local name=$1 limit=$2; shift 2
  if timeout "$limit" "$@" > "$out/$name.out" 2> "$out/$name.log"; then
    mv "$out/$name.out" "$out/$name.json"
  else
    echo "{\"benchmark\": \"$name\", \"error\": \"exit $? (see $name.log)\"}" > "$out/$name.json"
    rm -f "$out/$name.out"
  fi
}

if [ "$mode" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" || true
  if [ "$parts" = rehearse ]; then
    # every stage of the 256 config at its shapes on this GPU, device memory against the plan (stages.rehearse)
    run rehearse-cuda 300 "$PY" -m srcflow.cli rehearse --config configs/imagenet256.yaml --weights random --json
  fi
  if [ "$parts" = all ] || [ "$parts" = encode ]; then
    # encode, 240 s at most: every decode path per core and on the device, the stage once per path, the writers
    run encode-cuda 120 "$PY" -m benchmarks.encode --device cuda --arch dinov2-b --images 2048 --batch 256 \
        --decode pil,tensor,nvjpeg --rss-images 256 --write-mb 300 --repeats 2 --writers 1,3
    # torch.compile (compiled before the timing, in its own part: a slow compile costs only this part)
    run encode-cuda-compile 60 "$PY" -m benchmarks.encode --device cuda --arch dinov2-b --images 1024 --batch 256 \
        --decode nvjpeg --compile --throughput-only
    # three worker processes share the GPU: three Zarr writers and decode pools, each with its own GIL
    run encode-cuda-workers3 60 "$PY" -m benchmarks.encode --device cuda --arch dinov2-b --images 1024 \
        --batch 256 --workers 3 --decode tensor,nvjpeg --throughput-only
  fi
  if [ "$parts" = all ] || [ "$parts" = train ]; then
    # eager, then the compiled loss (its compile in warmup_seconds, outside the timing; its loss against eager's)
    run train_flow-cuda 45 "$PY" benchmarks/train_flow.py --config configs/imagenet256.yaml --device cuda \
        --batch 256 --steps 10 --warmup 3
    run train_flow-cuda-compiled 90 "$PY" benchmarks/train_flow.py --config configs/imagenet256.yaml \
        --device cuda --batch 256 --steps 10 --warmup 2 --compile on
    run sample-cuda 105 "$PY" -m benchmarks.sample --device cuda --paper --bf16 --batch 8 --fit-steps 100 \
        --sweep 128,512,1024
  fi
else
  run encode-cpu-smoke 300 "$PY" -m benchmarks.encode --device cpu --arch smoke --images 32 --batch 16 \
      --rss-images 16 --write-mb 16 --repeats 1 --writers 1 --decode-images 8
  run train_flow-cpu-smoke 120 "$PY" benchmarks/train_flow.py --config configs/smoke.yaml --device cpu --steps 3
  run sample-cpu-smoke 300 "$PY" -m benchmarks.sample --device cpu --batch 1 --width 32 --heads 2 --blocks 2 \
      --layers 1 --tokens 16 --channels 4 --jacobi-chunk 8
  run rehearse-cpu-smoke 300 "$PY" -m srcflow.cli rehearse --config configs/smoke.yaml --classes 2 --steps 1 \
      --reference-images 4 --set 'sample.cfg_scale=[1.0]' --json
fi

"$PY" - "$out" "$mode" <<'PYEOF'
import json, sys
from pathlib import Path
out, mode = Path(sys.argv[1]), sys.argv[2]
tag = "-cuda" if mode == "cuda" else "-cpu-smoke"
def load(path):  # a part prints one JSON object, indented or on its last line
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(text.strip().splitlines()[-1])
parts = {p.stem: load(p) for p in sorted(out.glob(f"*{tag}*.json"))}  # encode-cuda-compile, ...-workers3 too
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None
print(json.dumps({"mode": mode, "gpu": gpu, "results": parts}, indent=2))
PYEOF
