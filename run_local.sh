#!/usr/bin/env bash
# Sets up .venv (first run only), then:
#   ./run_local.sh                                   build a patch dataset and score the built-in sample
#   ./run_local.sh --input PATTERN... --output URI [flags] [Beam flags]
#                                                    run build_dataset on your own data
# See `python -m pipelines.build_dataset --help` for every flag.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh

if [ $# -gt 0 ]; then
  exec python -m pipelines.build_dataset "$@"
fi

python -m pipelines.sample_data runs/sample
python -m pipelines.build_dataset --input runs/sample --output runs/local/dataset --overwrite
if [ -f models/defaults/classifier/config.json ]; then
  python -m pipelines.score --input runs/sample --output runs/local/scores --overwrite
fi
echo
echo "Results under $(pwd)/runs/local: dataset/ (patches, faces, errors, manifest.json) and scores/."
echo "Open runs/local/dataset/qa.png and runs/local/scores/qa.png to check them by eye."
