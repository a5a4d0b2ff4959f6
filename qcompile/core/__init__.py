"""Core IR and pass infrastructure: IR helpers and meta keys, the quantized-linear recognizer,
the pass API and registry, pipelines, the pass manager and its instruments, the verifier,
options (the only reader of `Q4_*` environment variables), memo, pattern rewrites, the printer.
Imports nothing of qcompile above `qcompile.kernels`."""
