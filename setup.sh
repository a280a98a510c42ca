#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch, the compiled
# PyG extensions and this package. A second run only checks and skips.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
# Installed distributions and versions, read from metadata (importing torch is slow).
installed() { "$PY" - "$@" <<'PYEOF'
import sys
from importlib import metadata
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if want and not have.startswith(want):
        sys.exit(1)
PYEOF
}

# torch and torchvision are pinned so that no resolver reaches for a newer,
# multi-GB build; pip takes them from the local wheel store where present.
installed torch==2.14.1 torchvision==0.29.1 || "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
installed ninja || "$PY" -m pip install -q ninja
# torch-scatter and torch-cluster ship only as source: they compile against
# the torch above (10-30 min on 2 cores the first time; pip's wheel cache
# makes later set-ups take seconds).
for ext in torch-scatter torch-cluster; do
  installed "$ext" || MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install --no-build-isolation "$ext"
done
# The package itself, editable, with the test extras; re-run only when
# pyproject.toml changed.
stamp=.venv/.gkg_pyg-installed
want=$(sha1sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! installed gkg-pyg; then
  "$PY" -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
