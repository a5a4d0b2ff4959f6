"""SmolLM2-135M prefill on CPU: FP32 eager, FP32 + Inductor and q4 recipes side by side.

    python benchmarks/bench_prefill_cpu.py [--tokens 512] [--recipes w4a4,w4a4-rtn] [--repeats 5] [--tiny]

The same as `python -m qcompile.tools.bench prefill` (which holds the code; see its docstring).
"""

import sys

from qcompile.tools.bench import main

if __name__ == "__main__":
    main(["prefill", *sys.argv[1:]])
