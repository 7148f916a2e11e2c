#!/usr/bin/env bash
# The GPU measurement behind bench/RESULTS.md's "On a GPU" section, as one script for a GPU host
# whose python3 already has torch with CUDA (a lent machine has no registry: the project's other
# dependencies come as wheels in $WHEELS, ./.whl by default, see bench/README.md).
#
#   N=8000 OUT=/tmp/gpu bash bench/gpu_host.sh
#
# DEVICE=cpu runs the same steps on a CPU host (a dry run of the script, at a small N).
# Each job is measured by its own harness run, so one that fails keeps the other's figures, and a
# run cut short leaves the runs it finished in OUT/gpu_<job>.partial.json. Back here:
#   python -m bench.throughput --rereport OUT/gpu_build_dataset.json OUT/gpu_score.json
set -uo pipefail
N=${N:-8000}
DEVICE=${DEVICE:-cuda}
WHEELS=${WHEELS:-.whl}
JOBS=${JOBS:-build_dataset score}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.csv"
fi
# Fail in seconds, not minutes: every import the jobs need, and one segmenter batch on the device.
DEVICE=$DEVICE python3 - <<'EOF' 2>&1 | tee "$OUT/check.log" || exit 1
import os, time
import apache_beam, numpy as np, pyarrow, segmentation_models_pytorch, torch
import bench.throughput, pipelines.build_dataset, pipelines.score
from models import defaults
from models.segmenter import Segmenter
print("beam", apache_beam.__version__, "torch", torch.__version__, "numpy", np.__version__, "pyarrow", pyarrow.__version__)
device = os.environ["DEVICE"]
if device == "cuda":
    import pynvml  # bench.gpu samples the GPU through it
model = Segmenter.load(defaults.SEGMENTER, device)
images = [np.random.default_rng(i).integers(0, 256, (1024, 1024, 3), dtype=np.uint8) for i in range(32)]
model.predict_masks(images)
start = time.perf_counter()
masks = model.predict_masks(images)
print(f"segmenter on {device}: 32 images in {time.perf_counter() - start:.3f} s; mask {masks[0].shape}")
EOF
for job in $JOBS; do
    python3 -m bench.throughput --peers --multi-only --device "$DEVICE" --images "$N" --jobs "$job" \
        --workdir /tmp/bench --keep --json "$OUT/gpu_$job.json" --markdown - 2>&1 | tee "$OUT/gpu_$job.log"
done
