#!/usr/bin/env bash
# The main job: creates the virtual environment if needed, then trains a tokenizer and a tiny MoE
# on the Python standard library's sources (a few CPU minutes), and shows what it learned.
# Extra arguments go to `orionlm quickstart` (e.g. --steps 200 --out runs/qs).
source "$(dirname "$0")/env.sh"
orionlm quickstart "$@"
