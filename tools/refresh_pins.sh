#!/usr/bin/env bash
# Remake constraints.txt: resolve setup.py's `dev` extra afresh in a new virtual environment and
# write what pip chose. Then run the suite (bash .ci/run) and commit constraints.txt only if it
# passes: the pins are the versions the suite last passed with.
#   bash tools/refresh_pins.sh            # TORCH=2.13.0 by default (the CPU build on CPU machines)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH:-2.13.0}
VENV=$(mktemp -d)
trap 'rm -rf "$VENV"' EXIT
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==$TORCH"
"$VENV/bin/pip" install -q -e ".[dev]"
{
  echo "# The exact versions the test suite last passed with (tools/setup_env.sh installs with them)."
  echo "# Remake with: bash tools/refresh_pins.sh   (then run the suite before committing)"
  # A local label (+cpu) is dropped so the same pin takes the CUDA build on GPU machines.
  "$VENV/bin/pip" freeze --exclude-editable | sed -E 's/\+[a-z0-9.]+$//' | LC_ALL=C sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
