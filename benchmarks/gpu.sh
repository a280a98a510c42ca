#!/usr/bin/env bash
# gkg-pyg on a GPU in one script (docs/gpu.md): compile torch-cluster for the visible GPU when it is
# missing, then benchmarks/gpu_check.py: checks against the CPU, the tests, throughput and peak memory
# at 448 and 576 px batch 16 with fp16 autocast per kNN backend, the authors' harness on the same
# card, and a short AMP + torch.compile training run that is stopped and resumed. The summary is one
# Markdown table, written to $OUT/gpu_report.md (or .gpu/gpu_report.md), the full log next to it.
#
#   bash benchmarks/gpu.sh [--sdist TORCH_CLUSTER_SDIST] [--harness DIR] [--dry-run] [gpu_check.py options]
#
#   --sdist PATH    torch-cluster's source distribution (torch_cluster-*.tar.gz); compiled with nvcc for
#                   this GPU's architecture only (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability())
#                   into .gpu/site, which a second call on the same machine reuses
#   --harness DIR   the authors' harness (../shared/authors_gkgnet/make_harness.sh) for the side-by-side steps
#   --dry-run       every step on the CPU at tiny sizes (gpu_check.py --smoke; a few minutes), the compile
#                   step only printed: checks this script and the steps without a GPU
#   other options   go to benchmarks/gpu_check.py, e.g. --steps checks tests (split the run over two calls
#                   to stay within a call's time limit), --sizes 448, --batch 16, --no-compile
set -euo pipefail
cd "$(dirname "$0")/.."
sdist=""
harness=""
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --sdist) sdist=${2:?--sdist needs a path}; shift 2 ;;
        --harness) harness=${2:?--harness needs a folder}; shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
py=${PYTHON:-python3}  # the GPU machine's python3 holds PyTorch; PYTHON=.venv/bin/python elsewhere
site=.gpu/site
out=${OUT:-.gpu}
mkdir -p "$out" "$site"
if [ -n "$sdist" ] && [ ! -f "$sdist" ]; then
    echo "gpu.sh: --sdist $sdist: no such file" >&2
    exit 2
fi
if [ -n "$harness" ] && [ ! -f "$harness/peak_memory.py" ]; then
    echo "gpu.sh: --harness $harness holds no peak_memory.py (build it with make_harness.sh)" >&2
    exit 2
fi
export PYTHONPATH="$PWD/$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

build_cluster() {  # compile torch-cluster for this GPU only, unless it imports already
    local version
    if version=$("$py" -c "import torch_cluster; print(torch_cluster.__version__)" 2>/dev/null); then
        echo "torch-cluster: $version (installed)"
        return
    fi
    if [ -z "$sdist" ]; then
        echo "torch-cluster is missing and no --sdist was given: the torch_cluster backend is left out"
        return
    fi
    if [ "$dry" = 1 ]; then
        echo "dry run: would compile $sdist with TORCH_CUDA_ARCH_LIST=<the GPU's compute capability>" \
            "FORCE_CUDA=1 MAX_JOBS=$(nproc) into $site"
        return
    fi
    arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    echo "compiling torch-cluster for sm_${arch/./} (log: $out/torch_cluster_build.log)"
    if ! TORCH_CUDA_ARCH_LIST=$arch FORCE_CUDA=1 MAX_JOBS=$(nproc) "$py" -m pip install --no-build-isolation \
        --no-deps --no-index --target "$site" "$sdist" >"$out/torch_cluster_build.log" 2>&1; then
        tail -n 20 "$out/torch_cluster_build.log"
        echo "compiling torch-cluster failed: the torch_cluster backend is left out"
    fi
}

if [ "$dry" = 1 ]; then
    echo "dry run: every step on the CPU at tiny sizes"
    build_cluster
    set +e
    "$py" benchmarks/gpu_check.py --smoke ${harness:+--harness "$harness"} --report "$out/gpu_report.md" "$@" \
        2>&1 | tee "$out/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
build_cluster
set +e
"$py" benchmarks/gpu_check.py --device cuda ${harness:+--harness "$harness"} --report "$out/gpu_report.md" "$@" \
    2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
