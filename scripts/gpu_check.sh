#!/usr/bin/env bash
# Issue 16's checks on a GPU machine, in one device call of under 10 minutes (a session has 15):
# the Triton kernels against their references compiled for the GPU, then `qcompile bench-gpu`'s
# table on a Llama-2-7B cut to 4 decoder layers (per-layer ratios hold). Logs and the table go
# under $OUT (the device tool brings that folder back).
#
#     bash scripts/gpu_check.sh            # from the repository root, on the GPU machine
#
# The machine's image has torch, triton, transformers, tabulate, tqdm, safetensors and pytest
# (../.library/device/KINDS.md), not torchao: its column then says "not installed" unless its
# wheel travels (see the device README on carrying wheels).
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export Q4_CPU_KERNELS=off  # no C++ CPU kernels to build there
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"; } 2>&1 | tee "$out/machine.txt"
# 1. correctness of every GPU kernel (the tiled GEMM tunes two candidates a key in its tests)
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_tiled_gemm.py \
    tests/kernels/test_triton_kernels.py 2>&1 | tee "$out/kernels.log"
# 2. the one table: GEMMs at Llama-2-7B shapes, decode at batch 1 and 16, 2048-token prefill
timeout 390 python3 -m qcompile.tools.bench_gpu --layers 4 --m 1,16,2048 --batches 1,16 --repeats 3 \
    2>&1 | tee "$out/bench-gpu.txt"
