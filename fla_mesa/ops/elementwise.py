"""The backward's elementwise work around fla's GLA backward passes, in three Triton kernels.

In PyTorch it was about twenty launches of casts, products and sums over `[B, T, H, K]` tensors (about 2.3 of the
15.3 GPU ms of a forward+backward at D=128 on an H100, benchmarks/RESULTS.md). Each kernel here reads its inputs
once, works in float32 and writes each result once, in its final dtype. Every tensor is contiguous `[B, T, H, *]`;
a program takes `BT` rows (tokens, over B * T) of one head. `bwd_prep` and `bwd_combine` serve `fp32_backward=False`
only (the default's `gla_backward` kernels need neither); `bwd_solve` serves both, except where `mesa_backward`'s
kernels give dq and dlamb themselves (K = V <= 64 with scaled states).
"""

import torch
import triton
import triton.language as tl

BT = 32


@triton.jit
def _rows(N, H: tl.constexpr, BT: tl.constexpr):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    return i_t, i_h, o_t, o_t < N, o_t.to(tl.int64) * H + i_h


@triton.jit
def bwd_prep_kernel(k, v, beta, x, kb, vb, xq, N, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KB: tl.constexpr, XQ: tl.constexpr):
    # kb = beta * k, vb = beta * v and xq = x, each in its output's dtype
    i_t, i_h, o_t, m_t, row = _rows(N, H, BT)
    b_beta = tl.load(beta + row, mask=m_t, other=0.).to(tl.float32)[:, None]
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m, p = m_t[:, None] & (o_k < K)[None, :], row[:, None] * K + o_k[None, :]
        if XQ:
            tl.store(xq + p, tl.load(x + p, mask=m, other=0.).to(xq.dtype.element_ty), mask=m)
        if KB:
            tl.store(kb + p, (b_beta * tl.load(k + p, mask=m, other=0.).to(tl.float32)).to(kb.dtype.element_ty), mask=m)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m, p = m_t[:, None] & (o_v < V)[None, :], row[:, None] * V + o_v[None, :]
        tl.store(vb + p, (b_beta * tl.load(v + p, mask=m, other=0.).to(tl.float32)).to(vb.dtype.element_ty), mask=m)


@triton.jit
def bwd_solve_kernel(u, x, dq, dy, dlamb, N, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     DY: tl.constexpr):
    # dq = u and (if DY) dy = -u, each in its output's dtype, and this program's rows' share of dlamb = -sum u * x
    i_t, i_h, o_t, m_t, row = _rows(N, H, BT)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m, p = m_t[:, None] & m_k[None, :], row[:, None] * K + o_k[None, :]
        b_u = tl.load(u + p, mask=m, other=0.).to(tl.float32)
        b_x = tl.load(x + p, mask=m, other=0.).to(tl.float32)
        tl.store(dq + p, b_u.to(dq.dtype.element_ty), mask=m)
        if DY:
            tl.store(dy + p, (-b_u).to(dy.dtype.element_ty), mask=m)
        tl.store(dlamb + (i_t * H + i_h) * K + o_k, -tl.sum(b_u * b_x, 0), mask=m_k)


@triton.jit
def bwd_combine_kernel(k, v, beta, dk_s, dk_h, dkb, dvb, dk, dv, dbeta, N, H: tl.constexpr, K: tl.constexpr,
                       V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KB: tl.constexpr):
    # dk = dk_s + dk_h + beta * dkb, dv = beta * dvb, dbeta = sum dkb * k + sum dvb * v
    i_t, i_h, o_t, m_t, row = _rows(N, H, BT)
    b_beta = tl.load(beta + row, mask=m_t, other=0.).to(tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m, p = m_t[:, None] & (o_k < K)[None, :], row[:, None] * K + o_k[None, :]
        b_dk = tl.load(dk_s + p, mask=m, other=0.).to(tl.float32)
        if KB:
            b_dkb = tl.load(dkb + p, mask=m, other=0.).to(tl.float32)
            b_dk += tl.load(dk_h + p, mask=m, other=0.).to(tl.float32) + b_beta[:, None] * b_dkb
            b_dbeta += tl.sum(b_dkb * tl.load(k + p, mask=m, other=0.).to(tl.float32), 1)
        tl.store(dk + p, b_dk.to(dk.dtype.element_ty), mask=m)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m, p = m_t[:, None] & (o_v < V)[None, :], row[:, None] * V + o_v[None, :]
        b_dvb = tl.load(dvb + p, mask=m, other=0.).to(tl.float32)
        b_dbeta += tl.sum(b_dvb * tl.load(v + p, mask=m, other=0.).to(tl.float32), 1)
        tl.store(dv + p, (b_beta[:, None] * b_dvb).to(dv.dtype.element_ty), mask=m)
    tl.store(dbeta + row, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)


def _launch(kernel, t: torch.Tensor, *args, **kwargs):
    B, T, H = t.shape[:3]
    kernel[(triton.cdiv(B * T, BT), H)](*args, N=B * T, H=H, BT=BT, num_warps=4, **kwargs)


def _tile(n: int) -> int:
    return min(128, max(16, triton.next_power_of_2(n)))


def bwd_prep(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, x: torch.Tensor, with_kb: bool):
    """Triton: `(beta * k if with_kb else None, beta * v, x)` in k's, v's and k's dtypes, products in float32; x itself
    when it has k's dtype already. k, x: `[B, T, H, K]`; v: `[B, T, H, V]`; beta: `[B, T, H]`."""
    K, V = k.shape[-1], v.shape[-1]
    kb = torch.empty_like(k) if with_kb else None
    vb = torch.empty_like(v)
    xq = x if x.dtype == k.dtype else torch.empty_like(x, dtype=k.dtype)
    _launch(bwd_prep_kernel, k, k, v, beta, x, kb, vb, xq, K=K, V=V, BK=_tile(K), BV=_tile(V), KB=with_kb,
            XQ=xq is not x)
    return kb, vb, xq


def bwd_solve(u: torch.Tensor, x: torch.Tensor, q_dtype: torch.dtype, dy_dtype: torch.dtype | None):
    """Triton: `(u in q_dtype, -u in dy_dtype (None without dy_dtype), dlamb = -sum over B, T of u * x)`; u, x:
    `[B, T, H, K]`, dlamb: `[H, K]` float32."""
    B, T, H, K = u.shape
    dq = torch.empty_like(u, dtype=q_dtype)
    dy = None if dy_dtype is None else torch.empty_like(u, dtype=dy_dtype)
    part = u.new_empty(triton.cdiv(B * T, BT), H, K, dtype=torch.float32)
    _launch(bwd_solve_kernel, u, u, x, dq, dy, part, K=K, BK=_tile(K), DY=dy is not None)
    return dq, dy, part.sum(0)


def bwd_combine(k, v, beta, dk_s, dk_h, dkb, dvb):
    """Triton: `dk = dk_s + dk_h + beta * dkb` in k's dtype, `dv = beta * dvb` in v's dtype and
    `dbeta = sum_K dkb * k + sum_V dvb * v` in beta's dtype, in float32 arithmetic; `dk_h` and `dkb` may both be
    None (no gradient through H). k, dk_*, dkb: `[B, T, H, K]`; v, dvb: `[B, T, H, V]`; beta: `[B, T, H]`."""
    K, V = k.shape[-1], v.shape[-1]
    dk, dv, dbeta = torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta)
    _launch(bwd_combine_kernel, k, k, v, beta, dk_s, dk_h, dkb, dvb, dk, dv, dbeta, K=K, V=V, BK=_tile(K),
            BV=_tile(V), KB=dkb is not None)
    return dk, dv, dbeta
