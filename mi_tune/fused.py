"""A gated (SwiGLU) MLP and its LoRA adapters as one autograd op, for training.

Plain PEFT + transformers keep five (tokens x intermediate) tensors per block for the backward pass:
gate(x), silu(gate(x)), up(x), their product, and (with LoRA dropout) the dropped copies of the
inputs. ``GatedLoraMLP`` keeps gate(x) and up(x) only, plus the rank-r LoRA intermediates and
one-byte dropout masks, and recomputes the element-wise rest in the backward pass (a few cheap
passes over memory, no extra matmul). Same function, same gradients; the activation memory of the
MLPs is roughly halved.

``fuse_gated_mlps(model)`` patches every Llama/Mistral/Qwen-style MLP whose three projections are
plain frozen ``nn.Linear`` layers or PEFT LoRA ``Linear`` layers (one active adapter, no DoRA, no
LoRA bias). At call time it falls back to the module's own forward whenever the fused op would not
compute the same thing: no grad, autocast on, adapters merged or several active, a quantized base.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
GATED_MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP", "GraniteMLP", "SmolLM3MLP"}


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _parts(layer, dtype):
    """(W, bias, A, B, scaling, dropout p) of a frozen nn.Linear or a PEFT LoRA Linear; None if the fused op
    would not reproduce its forward."""
    if type(layer) is nn.Linear:
        return None if layer.weight.requires_grad or layer.weight.dtype != dtype else (layer.weight, layer.bias, None, None, 0.0, 0.0)
    if not isinstance(layer, LoraLinear) or type(layer.base_layer) is not nn.Linear or layer.merged:
        return None
    base = layer.base_layer
    if base.weight.requires_grad or base.weight.dtype != dtype or (base.bias is not None and base.bias.requires_grad):
        return None
    active = [] if layer.disable_adapters else [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return base.weight, base.bias, None, None, 0.0, 0.0
    if len(active) > 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    A, B, drop = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if A.bias is not None or B.bias is not None or A.weight.dtype != dtype or B.weight.dtype != dtype:
        return None
    if isinstance(drop, nn.Dropout):
        p = drop.p if drop.training else 0.0
    elif isinstance(drop, nn.Identity):
        p = 0.0
    else:
        return None
    return base.weight, base.bias, A.weight, B.weight, float(layer.scaling[name]), float(p)


def _project(x, W, bias, A, B, scale, p):
    """x W^T + bias + scale * (drop(x) A^T) B^T. Returns (y, x A^T or None, keep-mask or None)."""
    y = F.linear(x, W, bias)
    if A is None:
        return y, None, None
    keep = torch.rand_like(x) >= p if p > 0 else None  # bool: one byte per element, kept instead of the dropped copy
    xa = _dropped(x, keep, p) @ A.t()
    y.addmm_(xa, B.t(), alpha=scale)
    return y, xa, keep


def _dropped(x, keep, p):
    return x if keep is None else x * keep / (1 - p)


def _lora_backward(dz, x, A, B, xa, keep, scale, p, need_A, need_B, need_x):
    """Gradients of y = scale * (drop(x) A^T) B^T: (dA, dB, dx contribution or None)."""
    dB = (dz.t() @ xa).mul_(scale) if need_B else None
    dxa = (dz @ B).mul_(scale)
    dA = dxa.t() @ _dropped(x, keep, p) if need_A else None
    dx = _dropped(dxa @ A, keep, p) if need_x else None
    return dA, dB, dx


class GatedLoraMLP(torch.autograd.Function):
    """y = down(silu(gate(x)) * up(x)), each projection frozen W (+ bias) plus an optional LoRA pair."""

    @staticmethod
    def forward(ctx, x, Wg, bg, Ag, Bg, Wu, bu, Au, Bu, Wd, bd, Ad, Bd, cfg):
        (sg, pg), (su, pu), (sd, pd) = cfg
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        g, xag, kg = _project(x2, Wg, bg, Ag, Bg, sg, pg)
        u, xau, ku = _project(x2, Wu, bu, Au, Bu, su, pu)
        h = F.silu(g) * u  # freed after the down projection; recomputed in backward
        y, had, kd = _project(h, Wd, bd, Ad, Bd, sd, pd)
        del h
        ctx.cfg = cfg
        ctx.save_for_backward(x2, g, u, Wg, Ag, Bg, xag, kg, Wu, Au, Bu, xau, ku, Wd, Ad, Bd, had, kd)
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        (sg, pg), (su, pu), (sd, pd) = ctx.cfg
        x2, g, u, Wg, Ag, Bg, xag, kg, Wu, Au, Bu, xau, ku, Wd, Ad, Bd, had, kd = ctx.saved_tensors
        need = ctx.needs_input_grad  # (x, Wg, bg, Ag, Bg, Wu, bu, Au, Bu, Wd, bd, Ad, Bd, cfg)
        dy2 = dy.reshape(-1, dy.shape[-1])
        act = F.silu(g)
        grads = [None] * 14
        # down projection
        dh = dy2 @ Wd
        if Ad is not None:
            h = act * u
            grads[11], grads[12], dxd = _lora_backward(dy2, h, Ad, Bd, had, kd, sd, pd, need[11], need[12], True)
            del h
            dh += dxd
            del dxd
        # silu(g) * u
        du = dh * act
        del act
        dg = torch.ops.aten.silu_backward(dh.mul_(u), g)
        # gate and up projections
        dx = dg @ Wg if need[0] else None
        if need[0]:
            dx.addmm_(du, Wu)
        for dz, A, B, xa, keep, scale, p, iA, iB in ((dg, Ag, Bg, xag, kg, sg, pg, 3, 4), (du, Au, Bu, xau, ku, su, pu, 7, 8)):
            if A is None:
                continue
            grads[iA], grads[iB], dxl = _lora_backward(dz, x2, A, B, xa, keep, scale, p, need[iA], need[iB], need[0])
            if dxl is not None:
                dx += dxl
        grads[0] = None if dx is None else dx.reshape(dy.shape[:-1] + (x2.shape[-1],))
        return tuple(grads)


def _fused_forward(self, x):
    if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
        parts = [_parts(getattr(self, name), x.dtype) for name in ("gate_proj", "up_proj", "down_proj")]
        if all(p is not None for p in parts):
            (Wg, bg, Ag, Bg, sg, pg), (Wu, bu, Au, Bu, su, pu), (Wd, bd, Ad, Bd, sd, pd) = parts
            return GatedLoraMLP.apply(x, Wg, bg, Ag, Bg, Wu, bu, Au, Bu, Wd, bd, Ad, Bd, ((sg, pg), (su, pu), (sd, pd)))
    return type(self).forward(self, x)


def _weight_dtype(layer):
    base = getattr(layer, "base_layer", layer)
    return getattr(getattr(base, "weight", None), "dtype", None)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Route the forward of every supported gated MLP in `model` through GatedLoraMLP. Returns how many.
    MLPs whose projections cannot be fused as they stand (a quantized base layer, DoRA, ...) are left alone."""
    n = 0
    for module in model.modules():
        if type(module).__name__ not in GATED_MLP_CLASSES or not _is_silu(getattr(module, "act_fn", None)):
            continue
        projections = [getattr(module, k, None) for k in ("gate_proj", "up_proj", "down_proj")]
        if any(p is None or _parts(p, _weight_dtype(p)) is None for p in projections):
            continue
        module.forward = MethodType(_fused_forward, module)
        n += 1
    return n


def unfuse_gated_mlps(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), MethodType) and module.__dict__["forward"].__func__ is _fused_forward:
            del module.forward
