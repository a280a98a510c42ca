#!/usr/bin/env bash
# The one device call of issue 8 on a lent GPU machine (PyTorch, PyG, timm and nvcc there; no
# network, no torch-cluster). Run from the repository root there:
#
#   bash experiments/gpu_run.sh .gpu/torch_cluster-*.tar.gz [.gpu/authors_harness] [gpu_check.py options]
#
# with torch-cluster's source distribution (and optionally the authors' harness built by
# ../shared/authors_gkgnet/make_harness.sh) copied into the ignored folder .gpu/ here and carried
# over (the device tool's carry: [".gpu"]). torch-cluster is compiled for this GPU's architecture
# only, into .gpu/site (reused by a second call on the same machine), then experiments/gpu_check.py
# runs the checks, benchmark.py at 448 and 576 batch 16 with fp16, and the harness; the log goes to
# $OUT/gpu_check.log when $OUT is set.
#
# Options after the harness ("" for none) go to experiments/gpu_check.py. To stay within one
# call's time limit, run `--sizes 448` first and, in a second call while the machine is still warm
# (the compiled torch-cluster in .gpu/site is reused), `--sizes 576 --no-checks`.
set -euo pipefail
sdist=${1:?usage: gpu_run.sh TORCH_CLUSTER_SDIST [HARNESS_DIR] [gpu_check.py options]}
harness=${2:-}
site=.gpu/site
py=${PYTHON:-python3}  # the device machine's python3 is the one that holds PyTorch
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! PYTHONPATH=$site "$py" -c "import torch_cluster" 2>/dev/null; then
    arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    echo "compiling torch-cluster for sm_$arch"
    TORCH_CUDA_ARCH_LIST=$arch FORCE_CUDA=1 MAX_JOBS=$(nproc) \
        "$py" -m pip install --no-build-isolation --no-deps --no-index --target "$site" "$sdist"
fi
export PYTHONPATH="$PWD/$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" experiments/gpu_check.py --device cuda ${harness:+--harness "$harness"} "${@:3}" 2>&1 | tee "${OUT:-.gpu}/gpu_check.log"
exit "${PIPESTATUS[0]}"
