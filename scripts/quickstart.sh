#!/usr/bin/env bash
# The main job: creates the virtual environment if needed, initialises a tiny MoE model,
# shows its architecture and streams a (random-weight) generation from it. No download.
source "$(dirname "$0")/env.sh"
out=${1:-runs/quickstart}
orionlm init "$out/model" --preset tiny-moe --seed 0 --force
orionlm info "$out/model"
orionlm generate "The history of" --model "$out/model" --max-tokens 40 --temp 0.8 --top-k 50 --seed 0
