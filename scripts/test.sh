#!/usr/bin/env bash
# The test suite. Creates the virtual environment first if it is missing.
source "$(dirname "$0")/env.sh"
python -m pytest "$@"
