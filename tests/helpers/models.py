"""Tiny random-weight transformers models built from configs (no downloads; the builders are
qcompile.tools.tiny_models, which `qcompile zoo-matrix` compiles too), small modules that hold one
structure a pass rewrites, and token ids."""

from __future__ import annotations

import torch

from qcompile.tools.tiny_models import tiny_bert, tiny_llama, tiny_model  # noqa: F401  (the tests import them here)


def ids(seq: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    """Token ids for the tiny models: (batch, seq) in [0, 256)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=g)


def inputs(batch=2, seq=11, seed=3):
    """Token ids for the tiny models, without the padding id 0: (batch, seq) in [1, 256)."""
    return torch.randint(1, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


class TwoHeads(torch.nn.Module):
    """A norm feeding two linears (like q/k), and a third reading their sum."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(16)
        self.q = torch.nn.Linear(16, 8)
        self.k = torch.nn.Linear(16, 8, bias=False)
        self.out = torch.nn.Linear(8, 5)

    def forward(self, x):
        h = self.norm(x)
        return self.out(self.q(h) + self.k(h))


class Positioned(torch.nn.Module):
    """TwoHeads with a rotary-style position input: the norm's output plus cos(position * freq),
    so the graph holds integer positions feeding an `aten.cos` (what insert-quantizers{sinks=true}
    finds). forward(x [B, T, 16], position_ids [B or 1, T])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(16)
        self.register_buffer("inv_freq", torch.linspace(1.0, 0.01, 16))
        self.q = torch.nn.Linear(16, 8)
        self.k = torch.nn.Linear(16, 8, bias=False)
        self.out = torch.nn.Linear(8, 5)

    def forward(self, x, position_ids):
        h = self.norm(x) + torch.cos(position_ids[:, :, None].float() * self.inv_freq)
        return self.out(self.q(h) + self.k(h))


class Zero(torch.nn.Module):
    """A linear whose input is all zeros: calibration sees nothing to scale."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x * 0)


class Planted(torch.nn.Module):
    """Channel 3 of the first linear's input is 300x larger than the rest."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 8)
        self.b = torch.nn.Linear(8, 4)
        self.register_buffer("gain", torch.ones(16))
        self.gain[3] = 300.0

    def forward(self, x):
        return self.b(self.a(x * self.gain))
