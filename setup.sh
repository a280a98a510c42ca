#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch, the compiled
# PyG extensions and this package. A second run only checks and skips.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
TEST_STEP=0
[ "${1:-}" = "--test" ] && TEST_STEP=1
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
# torch-scatter and torch-cluster ship only as source. Each is a set of
# small extension modules that setuptools compiles one after the other, so
# both packages are built side by side, each with a pool of `nproc`
# extension builds (build_ext --parallel through DIST_EXTRA_CONFIG), into a
# wheel folder keyed by the torch version; a later set-up, even in a fresh
# clone, installs from there in seconds.
torch_version=$("$PY" -c 'from importlib.metadata import version; print(version("torch"))')
wheels=${GKG_PYG_WHEELS:-$HOME/.cache/gkg-pyg/wheels/torch-$torch_version}
build_pids=()
for ext in torch-scatter torch-cluster; do
  installed "$ext" && continue
  mkdir -p "$wheels"
  ls "$wheels/${ext//-/_}"-*.whl >/dev/null 2>&1 && continue
  printf '[build_ext]\nparallel = %s\n' "${BUILD_JOBS:-$(nproc)}" > "$wheels/build_ext.cfg"
  echo "setup.sh: compiling $ext (about 10 min on 2 cores the first time; log: $wheels/$ext.log)"
  DIST_EXTRA_CONFIG="$wheels/build_ext.cfg" "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$wheels" "$ext" \
    >"$wheels/$ext.log" 2>&1 &
  build_pids+=("$!")
done
for pid in "${build_pids[@]}"; do
  wait "$pid" || { tail -n 30 "$wheels"/*.log; echo "setup.sh: compiling failed (logs in $wheels)" >&2; exit 1; }
done
for ext in torch-scatter torch-cluster; do
  installed "$ext" || "$PY" -m pip install -q "$wheels/${ext//-/_}"-*.whl
done
# The package itself, editable, with the test extras; re-run only when
# pyproject.toml changed.
stamp=.venv/.gkg_pyg-installed
want=$(sha1sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! installed gkg-pyg; then
  "$PY" -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi

# The test step (./setup.sh --test): the HTML viewer's tests drive a headless Chromium.
if [ "$TEST_STEP" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: installing chromium for the viewer tests (apt-get)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup.sh: chromium is missing and cannot be installed here (needs root and apt-get); the viewer tests will skip" >&2
  fi
fi
