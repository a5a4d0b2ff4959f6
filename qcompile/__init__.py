"""qcompile: a quantizing compiler for PyTorch.

    model = torch.compile(model, backend="q4", options={"recipe": "w4a4-rtn", "calibration": batches})

The `q4` backend is registered through the `torch_dynamo_backends` entry point, so importing
qcompile is not needed for torch.compile; import it for the pass API and the helpers.
"""

__version__ = "0.1.0"
