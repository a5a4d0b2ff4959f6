"""qcompile: a quantizing compiler for PyTorch.

    model = torch.compile(model, backend="q4", options={"recipe": "w4a4-rtn", "calibration": batches})

    qmodel = qcompile.quantize(model, calibration=batches)     # offline: quantize once,
    qmodel.save("dir")                                         # save,
    qmodel = qcompile.load(model, "dir")                       # and load with no calibration
    print(qcompile.explain(model, batches[0], calibration=batches))   # what each pass and linear did

The `q4` backend is registered through the `torch_dynamo_backends` entry point, so importing
qcompile is not needed for torch.compile; import it for the pass API and the helpers.
"""

__version__ = "0.1.0"

__all__ = ["quantize", "load", "explain", "QuantizedModel", "ArtifactError", "__version__"]

# Imported on first use: `import qcompile` stays cheap, and these modules import torch.
_LAZY = {"quantize": "api.artifact", "load": "api.artifact", "QuantizedModel": "api.artifact", "ArtifactError": "api.artifact",
         "explain": "api.explain"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"qcompile.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
