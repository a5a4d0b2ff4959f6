"""On a GPU: q4's W4A4 GEMMs and a Llama-2-7B-config model end to end against FP16 (cuBLAS,
Inductor max-autotune with CUDA graphs) and torchao int4 weight-only, one table with a roofline.

    python benchmarks/bench_gpu.py [--m 1,16,2048] [--batches 1,16] [--prefill-tokens 2048] [...]

The same as `qcompile bench-gpu` (`qcompile/tools/bench_gpu.py` holds the code; see its docstring).
"""

import sys

from qcompile.tools.bench_gpu import main

if __name__ == "__main__":
    main(sys.argv[1:])
