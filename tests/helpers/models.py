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


class Experts(torch.nn.Module):
    """A mixture of experts' two grouped GEMMs as transformers runs them (x's rows sorted by
    expert, `offs` their cumulative counts): gate_up [E, 2I, H], a gated product, down [E, H, I].
    `aten=True` calls torch._grouped_mm (bf16 under compile), else transformers' opaque fallback."""

    def __init__(self, experts: int = 3, hidden: int = 16, inner: int = 8, aten: bool = False, seed: int = 0):
        super().__init__()
        import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers)

        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, 2 * inner, hidden, generator=g) / hidden**0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, inner, generator=g) / inner**0.5)
        self.aten = aten

    def grouped_mm(self, x, w, offs):
        if self.aten:
            return torch._grouped_mm(x, w.transpose(-2, -1), offs)
        return torch.ops.transformers.grouped_mm_fallback(x, w.transpose(-2, -1), offs)

    def forward(self, x, offs):
        gate, up = self.grouped_mm(x, self.gate_up_proj, offs).chunk(2, dim=-1)
        return self.grouped_mm(torch.nn.functional.silu(gate) * up, self.down_proj, offs)


def expert_inputs(counts=(4, 0, 5), hidden=16, seed=0):
    """(x [S, hidden], offs int32 [E]): rows sorted by expert, expert 1 empty."""
    x = torch.randn(sum(counts), hidden, generator=torch.Generator().manual_seed(seed))
    return x, torch.cumsum(torch.tensor(counts), 0).to(torch.int32)


def experts_case(aten: bool):
    """(Experts(aten), x, offs) in the dtype its grouped GEMM takes: torch._grouped_mm on CPU takes bf16 only."""
    dtype = torch.bfloat16 if aten else torch.float32
    x, offs = expert_inputs()
    return Experts(aten=aten).eval().to(dtype), x.to(dtype), offs
