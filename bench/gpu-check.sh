#!/usr/bin/env bash
# The GPU check (README, "GPUs"): run from the repository root on a machine with an NVIDIA GPU,
# its driver, Python and PyTorch, but no Rust toolchain. It uses binaries built elsewhere by
# `cargo xtask check-cuda --build` (target/cuda/release, or $BIN). Under 8 minutes. It writes
# its measurements to $OUT (default target/gpu-check) and prints a summary:
#   1. the built-in model end to end on the GPU, against the same binary's CPU run;
#   2. a svd-small UNet step (64x64 latents, 14 frames, CFG batch 2) on the GPU, original,
#      paper 7/7 and a budget: its output against the CPU's, and the device's peak memory
#      (read from the driver while the step runs) beside the planned peak;
#   3. the same svd-small step in diffusers on the same GPU, when diffusers is importable.
set -euo pipefail
BIN=${BIN:-target/cuda/release}
OUT=${OUT:-target/gpu-check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
bench="$BIN/streamline-bench"
# The packed binary `cargo xtask check-cuda --build` leaves to carry to a GPU machine.
if [ ! -x "$bench" ] && [ -f target/cuda/streamline-bench.gz ]; then
  bench="$OUT/streamline-bench"
  gunzip -c target/cuda/streamline-bench.gz > "$bench" && chmod +x "$bench"
fi
[ -x "$bench" ] || { echo "no $bench: build it with cargo xtask check-cuda --build" >&2; exit 1; }
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-8}

echo "== 1. built-in model, GPU vs CPU"
for dev in cpu cuda; do
  "$bench" svd --model models/default --image examples/red.png --optimization original \
    --device "$dev" --runs 1 --num-inference-steps 25 \
    --out "$OUT/default-$dev.json" --output "$OUT/default-$dev.safetensors"
done
"$bench" compare --frames --output "$OUT/default-cuda.safetensors" \
  --reference "$OUT/default-cpu.safetensors" | tee "$OUT/default-compare.json"

echo "== 2. svd-small UNet step on the GPU"
"$bench" prepare-unet --dir "$OUT/svd-small" --config svd-small --frames 14 --batch 2 --latent 64
"$bench" unet --dir "$OUT/svd-small" --optimization original --device cpu --runs 0 \
  --out "$OUT/unet-cpu.json" --output "$OUT/unet-cpu.safetensors"
for mode in original paper budget; do
  "$bench" unet --dir "$OUT/svd-small" --optimization "$mode" --memory-budget 200MiB \
    --device cuda --runs 3 --out "$OUT/unet-cuda-$mode.json" --output "$OUT/unet-cuda-$mode.safetensors"
  "$bench" compare --output "$OUT/unet-cuda-$mode.safetensors" \
    --reference "$OUT/unet-cpu.safetensors" > "$OUT/unet-cuda-$mode-compare.json"
done

echo "== 3. diffusers on the same GPU"
if "$PYTHON" -c "import diffusers, safetensors" 2>/dev/null; then
  "$PYTHON" bench/diffusers_peer.py unet --dir "$OUT/svd-small" --device cuda --runs 3 \
    --out "$OUT/unet-diffusers.json" --output "$OUT/unet-diffusers.safetensors"
  "$bench" compare --output "$OUT/unet-diffusers.safetensors" \
    --reference "$OUT/unet-cpu.safetensors" > "$OUT/unet-diffusers-compare.json"
else
  echo "diffusers (or safetensors) is not importable here: step 3 skipped"
fi

"$PYTHON" - "$OUT" <<'EOF'
import json, os, statistics, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
mib = lambda b: f"{b / 2**20:.1f} MiB"
print("built-in model, GPU vs CPU frames:", load("default-compare.json"))
diffusers = load("unet-diffusers.json")
for mode in ["original", "paper", "budget"]:
    m, err = load(f"unet-cuda-{mode}.json"), load(f"unet-cuda-{mode}-compare.json")
    planned, device = m["planned_peak_bytes"], m.get("device_peak_bytes")
    ratio = f"{device / planned:.2f}x planned" if device else "not measured"
    line = (f"svd-small {mode}: step {statistics.median(m['step_seconds']):.3f} s, "
            f"planned {mib(planned)}, device peak {mib(device or 0)} ({ratio}), "
            f"rel. L2 vs CPU {err['rel_l2']:.1e}")
    if diffusers:
        line += f", {statistics.median(m['step_seconds']) / statistics.median(diffusers['step_seconds']):.2f}x diffusers' step"
    print(line)
if diffusers:
    print(f"diffusers svd-small: step {statistics.median(diffusers['step_seconds']):.3f} s, "
          f"device peak {mib(diffusers.get('device_peak_bytes', 0))}, "
          f"rel. L2 vs our CPU {load('unet-diffusers-compare.json')['rel_l2']:.1e}")
EOF
