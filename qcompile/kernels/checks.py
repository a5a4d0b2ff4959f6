"""Argument checks shared by the q4 ops (`ops.py`) and the Triton launchers (`triton_gemm.py`,
`triton_norm.py`): each names the argument that is wrong and what it should have been.

    check_step("linear_w4a4", "a_step", a_step, (), check_values=True)
    # KernelArgumentError: q4::linear_w4a4: argument 'a_step' must be finite and > 0, got nan
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import formats


class KernelArgumentError(ValueError):
    """An argument of a q4 op has the wrong dtype, shape, device or value."""


def fail(op: str, arg: str, expected: str, got: str) -> None:
    raise KernelArgumentError(f"q4::{op}: argument '{arg}' must be {expected}, got {got}")


def describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return repr(t)


def check_device(op: str, first: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for arg, t in others.items():
        if t is not None and t.device != first.device:
            fail(op, arg, f"on {first.device} like the other tensors", describe(t))


def check_step(op: str, arg: str, step: torch.Tensor, shape: tuple, check_values: bool) -> None:
    """A float32 step of the given shape; with check_values (real tensors only), finite and > 0."""
    if step.dtype != torch.float32 or tuple(step.shape) != shape:
        form = "a 0-dim float32 tensor" if shape == () else f"a float32 tensor of shape {shape}"
        fail(op, arg, form, describe(step))
    if check_values and step.numel():
        lo, hi = torch.aminmax(step)  # NaN propagates to both, and fails `> 0`
        if not (lo.item() > 0 and hi.item() < math.inf):
            bad = ~((step > 0) & torch.isfinite(step))
            where = "" if shape == () else f" at index {int(bad.nonzero()[0, 0])}"
            value = step.reshape(-1)[bad.reshape(-1)][0].item()
            fail(op, arg, "finite and > 0", f"{value}{where}")


def activation_step_shape(x: torch.Tensor, step: torch.Tensor) -> tuple:
    """The shape an activation step of `x` must have: () per tensor, or x's leading dims and 1
    per row (a dynamic step) when `step` has any dims."""
    return () if step.dim() == 0 else (*x.shape[:-1], 1)


def check_float_dtype(op: str, arg: str, dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        fail(op, arg, "float32, float16 or bfloat16", str(dtype))


def check_packed(op: str, w_packed: torch.Tensor, w_step: torch.Tensor, k: int, k_name: str,
                 check_values: bool) -> None:
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        fail(op, "w_packed", "a 2-D uint8 tensor [N, ceil(K/2)] (see qcompile.kernels.int4)", describe(w_packed))
    if w_packed.shape[1] != (k + 1) // 2:
        fail(op, "w_packed", f"ceil(K/2) = {(k + 1) // 2} bytes a row for K = {k} ({k_name})",
             f"{w_packed.shape[1]} bytes a row ({describe(w_packed)})")
    check_step(op, "w_step", w_step, (w_packed.shape[0],), check_values)
    check_device(op, w_packed, w_step=w_step)


def check_multipliers(op: str, w_mult: Optional[torch.Tensor], w_packed: torch.Tensor, k: int, fmt: str,
                      check_values: bool) -> None:
    """None, or uint8 [N, G] group multipliers (formats.py): K = G * group with group a multiple of
    GROUP_ALIGN; with check_values, each in 1..max_multiplier(fmt)."""
    if w_mult is None:
        return
    n = w_packed.shape[0]
    if w_mult.dtype != torch.uint8 or w_mult.dim() != 2 or w_mult.shape[0] != n or w_mult.shape[1] < 1:
        fail(op, "w_mult", f"None or a uint8 tensor [N, G] = [{n}, K / group] of group multipliers", describe(w_mult))
    groups = w_mult.shape[1]
    if k % groups or (k // groups) % formats.GROUP_ALIGN:
        fail(op, "w_mult", f"G groups dividing K = {k} into groups of a multiple of {formats.GROUP_ALIGN} k",
             f"G = {groups}")
    check_device(op, w_packed, w_mult=w_mult)
    if check_values and w_mult.numel():
        top = formats.max_multiplier(fmt)
        lo, hi = torch.aminmax(w_mult)
        if lo.item() < 1 or hi.item() > top:
            fail(op, "w_mult", f"multipliers in 1..{top} (their products with {fmt} values fit int8)",
                 f"{lo.item()}..{hi.item()}")


def check_contiguous(op: str, **tensors: Optional[torch.Tensor]) -> None:
    for arg, t in tensors.items():
        if t is not None and not t.is_contiguous():
            fail(op, arg, "contiguous (call .contiguous() first)", f"strides {t.stride()} for {describe(t)}")


def check_bias(op: str, bias: Optional[torch.Tensor], n: int) -> None:
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (n,)):
        fail(op, "bias", f"None or a float tensor of shape ({n},)", describe(bias))
