"""The front half of the q4 backend: capture helpers, normalize, freeze, calibration and its
cache. Runs before the passes; imports the pass registry, the core and the kernels."""
