#!/usr/bin/env bash
# The main job on the embedded default (CPU, offline, a few minutes):
#   train role adapters with a shared A (recipes/tiny.yaml) -> export a bundle -> serve a multi-role trajectory
#   in all four cache modes, ending with the side-by-side comparison table.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
accelerate launch --config_file recipes/accelerate/cpu.yaml -m lragent.train --config recipes/tiny.yaml --overwrite
lragent export --run runs/tiny --out bundles/tiny --force
# one torch thread: the tiny model's ops are too small to split across cores (as in the README's tables)
lragent run --bundle bundles/tiny --trajectory examples/trajectories/toy_lookup_3_rounds.json --mode all --repeat 5 \
    --threads 1
