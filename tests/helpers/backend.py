"""Compile and run through the public door, `torch.compile(model, backend="q4", options=...)`."""

from __future__ import annotations

import torch

import qcompile.backends.q4 as q4_backend
from qcompile.backends.q4 import Q4Backend

EAGER = {"lower": "eager", "progress": False}


def compile_and_run(model, options, *args, **kwargs):
    """(compiled model, its output on the arguments, the compiled graph's artifact)."""
    compiled = torch.compile(model, backend="q4", options=options)
    with torch.no_grad():
        out = compiled(*args, **kwargs)
    return compiled, out, q4_backend.compiled_graphs()[-1]


def counting_backend(options: dict) -> tuple[Q4Backend, list]:
    """The q4 backend `backend="q4", options=options` makes, and the list of the graphs it compiles."""
    graphs: list = []
    return Q4Backend(options, on_compiled=lambda graph, _inputs: graphs.append(graph)), graphs
