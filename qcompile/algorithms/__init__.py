"""Numerical methods the passes call: GPTQ, scale and clipping searches, accuracy metrics.
Imports only `qcompile.core` and `qcompile.kernels`."""
