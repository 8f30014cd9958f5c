"""fla modules that also run on CPU tensors.

fla's `ShortConvolution`, `RMSNorm`, `FusedRMSNormGated` and `GatedMLP` launch Triton kernels, which fail on CPU
tensors ("0 active drivers"). The subclasses below keep fla's parameters, state-dict keys and cache formats and
call fla's kernels for CUDA tensors (on Hopper with narrowed autotune spaces: `fla_mesa.ops.tuning`); for any other
device they compute the same math in plain PyTorch (in float32, or float64 for float64 inputs, cast back to the input
dtype, as the kernels do). A model built from them on CPU loads into the same model on GPU and back, and a conv cache
written by one path is read by the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.modules import FusedRMSNormGated as _FusedRMSNormGated
from fla.modules import GatedMLP as _GatedMLP
from fla.modules import RMSNorm as _RMSNorm
from fla.modules import ShortConvolution as _ShortConvolution

from fla_mesa.ops.tuning import narrow_fla_autotune

__all__ = ['FusedRMSNormGated', 'GatedMLP', 'RMSNorm', 'ShortConvolution', 'l2_norm']


def _up(x: torch.Tensor) -> torch.Tensor:
    """x in its compute dtype: at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalises the last dim (fla's `l2_norm` on CUDA, `x / sqrt(sum(x^2) + eps)` in float32 elsewhere)."""
    if x.is_cuda:
        from fla.modules.l2norm import l2_norm as _l2_norm
        narrow_fla_autotune(x.device)
        return _l2_norm(x, eps=eps)
    xf = _up(x)
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def _rms_norm_torch(x, weight, bias, eps):
    xf = _up(x)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _up(weight)
    if bias is not None:
        y = y + _up(bias)
    return y


class RMSNorm(_RMSNorm):
    """fla `RMSNorm` (same signature: `forward(x, residual=None, prenorm=False, residual_in_fp32=False)`)."""

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        if x.is_cuda:
            narrow_fla_autotune(x.device)
            return super().forward(x, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
        dtype = x.dtype
        if residual is not None:
            x = _up(x) + _up(residual)
            residual_out = x if residual_in_fp32 else x.to(residual.dtype)
        else:
            residual_out = _up(x) if residual_in_fp32 else x
        y = _rms_norm_torch(x, self.weight, self.bias, self.eps).to(dtype)
        return (y, residual_out) if prenorm else y


class FusedRMSNormGated(_FusedRMSNormGated):
    """fla `FusedRMSNormGated`: `rmsnorm(x) * weight * act(g)`, act = swish/silu (`g * sigmoid(g)`) or sigmoid."""

    def forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        if x.is_cuda:
            narrow_fla_autotune(x.device)
            return super().forward(x, g, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
        dtype = x.dtype
        if residual is not None:
            x = _up(x) + _up(residual)
            residual_out = x if residual_in_fp32 else x.to(residual.dtype)
        else:
            residual_out = _up(x) if residual_in_fp32 else x
        y = _rms_norm_torch(x, self.weight, self.bias, self.eps)
        gf = _up(g)
        y = y * (gf * torch.sigmoid(gf) if self.activation in ('swish', 'silu') else torch.sigmoid(gf))
        y = y.to(dtype)
        return (y, residual_out) if prenorm else y


class ShortConvolution(_ShortConvolution):
    """fla `ShortConvolution` (a depthwise causal `nn.Conv1d`) with a PyTorch path for non-CUDA tensors.

    The cache has fla's format `[N, D, W]`: the last `W` raw (pre-convolution) inputs of each sequence, newest at
    index `W - 1`. As on CUDA, a call with autograd off and one token per sequence updates a given cache in place.
    """

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,
        output_final_state: bool = False,
        cu_seqlens: torch.LongTensor | None = None,
        chunk_indices: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.is_cuda:
            narrow_fla_autotune(x.device)
            return super().forward(x=x, residual=residual, mask=mask, cache=cache, output_final_state=output_final_state,
                                   cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, **kwargs)
        B, T, D = x.shape
        W = self.kernel_size[0]
        if mask is not None:
            if cu_seqlens is not None:
                raise ValueError("`mask` and `cu_seqlens` cannot be provided at the same time")
            x = x * mask.unsqueeze(-1).to(x.dtype)
        ct = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(ct)  # [D, 1, W]
        bias = self.bias.to(ct) if self.bias is not None else None

        def conv(xs, prev):  # xs [n, T, D], prev [n, D, W] -> y [n, T, D], state [n, D, W]
            full = torch.cat([prev.to(ct), xs.to(ct).transpose(1, 2)], dim=-1)  # cached inputs, then the new ones
            y = F.conv1d(full[..., 1:], weight, bias, groups=D)  # W - 1 cached inputs of context
            return y.transpose(1, 2), full[..., -W:]

        if cu_seqlens is None:
            N = B
            y, final_state = conv(x, cache if cache is not None else x.new_zeros(B, D, W, dtype=ct))
        else:
            bounds = cu_seqlens.tolist()
            N = len(bounds) - 1
            ys, states = [], []
            for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
                prev = cache[n:n + 1] if cache is not None else x.new_zeros(1, D, W, dtype=ct)
                y_n, state_n = conv(x[:, s:e], prev)
                ys.append(y_n)
                states.append(state_n)
            y = torch.cat(ys, dim=1) if ys else x.new_zeros(1, 0, D, dtype=ct)
            final_state = torch.cat(states) if states else x.new_zeros(0, D, W, dtype=ct)
        if self.activation in ('silu', 'swish'):
            y = F.silu(y)
        if residual is not None:
            y = y + residual.to(ct)
        y = y.to(x.dtype)
        final_state = final_state.to(x.dtype)
        in_place = not torch.is_grad_enabled() and B * T == N and cache is not None
        if in_place:
            cache.copy_(final_state)
            final_state = cache
        return y, (final_state if output_final_state else None)


class GatedMLP(_GatedMLP):
    """fla `GatedMLP` (SwiGLU: `down(silu(gate(x)) * up(x))`); the fused SwiGLU kernel is used on CUDA only."""

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if x.is_cuda:
            narrow_fla_autotune(x.device)
            return super().forward(x, **kwargs)
        gate, y = self.gate_proj(x), self.up_proj(x)
        if self.hidden_act == 'swish':
            return self.down_proj(F.silu(gate) * y)
        raise NotImplementedError(f"hidden_act={self.hidden_act!r} has no CPU path; use 'swish'")
