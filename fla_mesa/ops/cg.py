"""Conjugate gradient for (H_t + diag(lamb)) x_t = b_t at every t at once.

Tokens are independent systems, so a chunk of tokens needs only its chunk-start state H_c and its own
keys: the Triton kernel keeps a chunk's keys, gates, state and CG vectors on chip across all iterations (fla
has no such kernel: its GLA primitives would take one launch and a round trip to memory per iteration).
CG is plain, or preconditioned with the Jacobi preconditioner diag(H_t + diag(lamb)) (`cg_precond='jacobi'`; the
start x_0 = b / diag(...) is the separate `cg_init`). Each token stops once ||r_k|| <= max(cg_tol, floor) * ||r_0||,
and a chunk's loop ends when all its tokens have stopped, or after `cg_steps` iterations. The floor follows the
products' precision: the compute dtype's machine epsilon for the PyTorch path (iterating past it lets the
recursively updated residual underflow, and CG then diverges), `TF32_FLOOR` for the Triton kernel's products,
tf32 or scaled float16 (`products_dtype`; with tf32, more iterations moved no error of o or of a gradient by 1%:
benchmarks/RESULTS.md, fifteenth session).
"""

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fla_mesa.ops.chunk_index import chunk_position
from fla_mesa.ops.scaled_states import state_parts
from fla_mesa.ops.torch_chunk import chunk_diag, chunk_output, decay_matrix, pad_to_chunks
from fla_mesa.ops.utils import cg_init_guess, cg_threshold


# the kernel holds a [K, K] float32 state tile in shared memory and [rows, K] float32 CG vectors in registers
MAX_KERNEL_K = 128
# the kernel's CG floor with tf32 or float16 products (unit roundoff 2^-11): stopping at a relative residual of
# 2^-16 adds an error (at most cond(H_t + diag(lamb)) * 2^-16) a 32nd of the products' rounding error (about
# cond * 2^-11)
TF32_FLOOR = 2 ** -16
# the output pass's value tile, whatever V: at 32 columns compute-sanitizer finds out-of-range shared addresses in
# its products (Triton 3.7.1, benchmarks/RESULTS.md, twenty-second and twenty-third sessions)
OUTPUT_BV = 64


def full_products() -> bool:
    """Whether the kernel's float32 products are full float32 (`TRITON_F32_DEFAULT=ieee`, or Triton's interpreter)
    rather than tf32."""
    return os.environ.get('TRITON_F32_DEFAULT') == 'ieee' or os.environ.get('TRITON_INTERPRET') == '1'


def products_dtype(dtype: torch.dtype):
    """The kernel's product operand type for keys of `dtype`. Half-precision inputs: float16 operands scaled by powers
    of two, tf32's 11-bit significand rounded to nearest at twice its tensor-core rate (1.6x faster CG iterations
    on an H100). Float32 inputs keep float32 (tf32) operands: with fp32 inputs, tf32's truncation in the CG solves
    offsets the same truncation in the backward's other products, and float16 solves made dq, dv and dlamb 1.4x
    less accurate (benchmarks/RESULTS.md, eighteenth session)."""
    return tl.float16 if dtype in (torch.bfloat16, torch.float16) and not full_products() else tl.float32


def kernel_floor() -> float:
    """The relative residual at which the kernel's CG stops without `cg_tol`: `TF32_FLOOR`, or float32's machine
    epsilon where its products are full float32 (`full_products`)."""
    return torch.finfo(torch.float32).eps if full_products() else TF32_FLOOR


@triton.jit
def _pow2(b_m):
    # the power of two at or below b_m (1 where b_m is 0 or subnormal): scaling by it, or by its inverse, is exact
    b_e = b_m.to(tl.int32, bitcast=True) & 0x7F800000
    return tl.where(b_e > 0, b_e.to(tl.float32, bitcast=True), 1.)


@triton.jit
def _scaled(b_a, PDT: tl.constexpr):
    # (b_a / sc, sc) with sc a power of two near b_a's largest magnitude, the quotient cast to the products' dtype:
    # float16 has tf32's 11-bit significand, and the scaling keeps the tile inside its range
    b_sc = _pow2(tl.max(tl.max(tl.abs(b_a), 1), 0))
    return (b_a * (1. / b_sc)).to(PDT), b_sc


@triton.jit
def _row_scales(b_a):
    # a power of two per row, near the row's largest magnitude
    return _pow2(tl.max(tl.abs(b_a), 1))


@triton.jit
def _scaled_rows(b_a, PDT: tl.constexpr):
    # `_scaled` with one power of two per row
    b_sc = _row_scales(b_a)
    return (b_a * (1. / b_sc)[:, None]).to(PDT), b_sc


@triton.jit
def _scaled_cols(b_a, PDT: tl.constexpr):
    # `_scaled` with one power of two per column
    b_sc = _pow2(tl.max(tl.abs(b_a), 0))
    return (b_a * (1. / b_sc)[None, :]).to(PDT), b_sc


@triton.jit
def _system_product(b_p, b_psc, b_k, b_kc, b_hm, b_hsc, b_decay, b_eg, b_lamb):
    # (H_t + diag(lamb)) p_t for the program's rows: exp2(g_t) H_c p_t from the chunk-start state, plus the chunk's
    # keys up to t (decay holds exp2(g_t - g_s) beta_s, scaled), plus lamb * p_t. The keys and the state come
    # `_scaled`, by sqrt(b_kc / decay's scale) and b_hsc; p is divided by b_psc, a power of two per row near the
    # row's largest entry or its norm (either keeps the row inside float16's range and its rounding at 2^-11 of the
    # row's norm)
    b_q = (b_p * (1. / b_psc)[:, None]).to(b_k.dtype)
    b_s = (tl.dot(b_q, tl.trans(b_k)) * b_decay).to(b_k.dtype)
    b_y = (b_psc * b_eg * b_hsc)[:, None] * tl.dot(b_q, b_hm) + (b_psc * b_kc)[:, None] * tl.dot(b_s, b_k)
    return b_y + b_lamb[None, :] * b_p


@triton.jit
def _value_tiles(v, h_kv, row_s, m_s, o_k, m_k, i_state, i_v, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    # the output pass's tiles of value columns [i_v * BV, (i_v + 1) * BV) as stored: the chunk's values and the
    # chunk-start state h_kv's columns (i_state: the chunk's and head's state)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_v = tl.load(v + row_s[:, None] * V + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0.)
    b_hv = tl.load(h_kv + i_state * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
    return b_v, b_hv


if os.environ.get('TRITON_INTERPRET') == '1':  # the interpreter has no libdevice
    @triton.jit
    def _start_quotient(b_b, b_diag):
        return b_b / b_diag
else:
    @triton.jit
    def _start_quotient(b_b, b_diag):
        # the Jacobi start b / diag: x_0 only starts CG (r_0 = b - A x_0 is formed from it), so div.approx's 2 ulp
        # serve, without the range handling of div.full (`/`): 3.5% of the CG kernel at K = 64 (benchmarks/RESULTS.md)
        return libdevice.fast_dividef(b_b, b_diag)


@triton.jit
def precondition(b_r, b_rs, b_dinv, PRECOND: tl.constexpr):
    # (z, r . z) over the last dim: z = r * dinv with PRECOND (CG preconditioned with M = diag(H_t + diag(lamb)),
    # b_dinv holding 1 / M, formed once: a multiply an iteration, not a division), else z = r and r . z = b_rs;
    # shared by the chunk and the decoding kernels
    b_z, b_rz = b_r, b_rs
    if PRECOND:
        b_z = b_r * b_dinv
        b_rz = tl.sum(b_r * b_z, -1)
    return b_z, b_rz


@triton.jit(do_not_specialize=['T', 'steps'])
def chunk_cg_kernel(
    b,
    k,
    beta,
    gc,
    h,
    hsc,
    lamb,
    x,
    iters,
    v,
    h_kv,
    hvsc,
    o,
    cu_seqlens,
    chunk_indices,
    tol_sq,
    steps,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PDT: tl.constexpr,
    SCALED_STATES: tl.constexpr,
    SOLVE: tl.constexpr,
    JACOBI: tl.constexpr,
    PRECOND: tl.constexpr,
    STORE_X: tl.constexpr,
    STORE_ITERS: tl.constexpr,
    OUTPUT: tl.constexpr,
    ADJOINT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    # one program: BR rows (tokens) of one chunk of BT, one head; the keys are the chunk's first BT rows
    i_tr, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, i_r = i_tr // (BT // BR), i_tr % (BT // BR)
    i_b, i_h = i_bh // H, i_bh % H
    i_tg, bos, T, t0 = chunk_position(i_t, i_b, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)
    i_state = (i_tg * H + i_h).to(tl.int64)  # the chunk's and head's states

    o_t = t0 + i_r * BR + tl.arange(0, BR)
    o_s = t0 + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t, m_s, m_k = o_t < T, o_s < T, o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    row = (bos + o_t) * H + i_h
    row_s = (bos + o_s) * H + i_h
    p_tk = row[:, None] * K + o_k[None, :]

    b_b = tl.load(b + p_tk, mask=m_tk, other=0.).to(tl.float32)
    if ADJOINT:  # V = K, float16 states: b holds the output gradient do, whose S_t do_t is formed below
        b_v, b_hv = _value_tiles(v, h_kv, row_s, m_s, o_k, m_k, i_state, 0, K, V, BK)
    b_k = tl.load(k + row_s[:, None] * K + o_k[None, :], mask=m_s[:, None] & m_k[None, :], other=0.).to(tl.float32)
    b_beta = tl.load(beta + row_s, mask=m_s, other=0.).to(tl.float32)
    b_gs = tl.load(gc + row_s, mask=m_s, other=0.).to(tl.float32)
    b_g = tl.load(gc + row, mask=m_t, other=0.).to(tl.float32)
    if OUTPUT and V <= BV:
        # one value tile: the output pass's loads go out now, their latency hidden behind the solve (a 2-3% faster
        # forward CG kernel at K = V = 64 on an H200, benchmarks/RESULTS.md)
        b_v, b_hv = _value_tiles(v, h_kv, row_s, m_s, o_k, m_k, i_state, 0, K, V, BV)

    # decay[t, s] = exp2(g_t - g_s) * beta_s for key s <= token t in the chunk
    m_ts = (o_t[:, None] >= o_s[None, :]) & m_t[:, None] & m_s[None, :]
    # divided by b_dsc, a power of two near the largest |beta_s|, so that decayed scores stay in float16's range
    b_dsc = _pow2(tl.max(tl.abs(b_beta), 0))
    b_decay = tl.exp2(tl.where(m_ts, b_g[:, None] - b_gs[None, :], 0.)) * (b_beta * (1. / b_dsc))[None, :]
    b_decay = tl.where(m_ts, b_decay, 0.)
    b_eg = tl.exp2(b_g)
    b_kq, b_ksc = _scaled(b_k, PDT)
    b_kc = b_ksc * b_ksc * b_dsc
    if ADJOINT:
        # the right-hand side S_t do_t = exp2(g_t) S_c do_t + sum_{s <= t} exp2(g_t - g_s) beta_s (do_t . v_s) k_s,
        # with S_c = h_kv [K, V] (float16, a power of two per value column): the output pass's products, transposed
        b_doq, b_dosc = _scaled_rows(b_b, PDT)
        b_vq, b_vsc = _scaled_rows(b_v.to(tl.float32), PDT)
        b_ds, b_dssc = _scaled_rows(tl.dot(b_doq, tl.trans(b_vq)) * b_vsc[None, :] * b_decay, PDT)
        b_hvsc = tl.load(hvsc + i_state * V + o_k, mask=m_k, other=1.)
        b_dhq, b_dhsc = _scaled_rows(b_b * b_hvsc[None, :], PDT)
        b_b = ((b_dosc * b_dssc * (b_ksc * b_dsc))[:, None] * tl.dot(b_ds, b_kq)
               + (b_dhsc * b_eg)[:, None] * tl.dot(b_dhq, tl.trans(b_hv.to(PDT))))

    b_x = b_b
    b_cnt = tl.zeros([BR], dtype=tl.int32)
    if SOLVE:  # cg_steps > 0; without it x = b (gated linear attention) and neither H's state nor lamb is read
        b_lamb = tl.load(lamb + i_h * K + o_k, mask=m_k, other=1.).to(tl.float32)
        p_h = h + i_state * K * K + o_k[:, None] * K + o_k[None, :]
        m_kk = m_k[:, None] & m_k[None, :]
        # loaded once: the compiler keeps this loop-invariant [K, K] state in shared memory for the whole solve.
        # Stored as float16 values with a power of two per column (SCALED_STATES), it is rescaled here to one power
        # of two for the whole tile, exactly (a power of two <= 1 times each column), so that the loop's products
        # take one scale, as with float32 states
        b_hm = tl.load(p_h, mask=m_kk, other=0.).to(tl.float32)
        if SCALED_STATES:
            b_hcol = tl.load(hsc + i_state * K + o_k, mask=m_k, other=1.)
            b_hm *= b_hcol[None, :]
        b_hm, b_hsc = _scaled(b_hm, PDT)
        b_diag = None  # diag(H_t + diag(lamb)), for the Jacobi start
        b_dinv = None  # its inverse, the preconditioner
        if JACOBI or PRECOND:
            b_hdiag = tl.load(h + i_state * K * K + o_k * (K + 1), mask=m_k, other=0.)
            if SCALED_STATES:
                b_hdiag = b_hdiag.to(tl.float32) * b_hcol
            # the in-chunk sum: at K <= 64 on the products' operands (the diagonal sets only CG's start and the
            # preconditioner; 7% faster CG at K = 64 on an H100, 1-3% slower at K = 128: benchmarks/RESULTS.md)
            if BK <= 64:
                b_dk = (b_ksc * b_ksc) * tl.dot(b_decay.to(PDT), b_kq * b_kq)
            else:
                b_dk = tl.dot(b_decay, b_k * b_k)
            b_diag = b_eg[:, None] * b_hdiag[None, :] + b_dsc * b_dk + b_lamb[None, :]
            if PRECOND:
                b_dinv = 1. / b_diag
        if JACOBI:
            b_x = _start_quotient(b_b, b_diag)
            b_r = b_b - _system_product(b_x, _row_scales(b_x), b_kq, b_kc, b_hm, b_hsc, b_decay, b_eg, b_lamb)
        else:
            b_x = tl.zeros([BR, BK], dtype=tl.float32)
            b_r = b_b
        b_rs = tl.sum(b_r * b_r, 1)
        b_p, b_rz = precondition(b_r, b_rs, b_dinv, PRECOND)
        b_thresh = tol_sq * b_rs

        # plain CG scales p's rows by their norms, which its recurrence gives without a reduction over K: p_0 = r_0,
        # and ||p_k+1||^2 = ||r_k+1||^2 + beta_k^2 ||p_k||^2 since r_k+1 . p_k = 0 (5% of the loop's instructions
        # at K = 64); preconditioned, p_k+1 = z_k+1 + beta_k p_k with z_k+1 . p_k != 0, so each row's largest entry
        b_pn = b_rs
        i = 0
        todo = tl.max(b_rs - b_thresh, 0) > 0
        while (i < steps) & todo:
            b_active = b_rs > b_thresh
            b_psc = _row_scales(b_p) if PRECOND else _pow2(tl.sqrt(b_pn))
            b_ap = _system_product(b_p, b_psc, b_kq, b_kc, b_hm, b_hsc, b_decay, b_eg, b_lamb)
            b_pap = tl.sum(b_p * b_ap, 1)
            b_alpha = tl.where(b_active & (b_pap > 0), b_rz / tl.where(b_pap > 0, b_pap, 1.), 0.)
            b_x += b_alpha[:, None] * b_p
            b_r -= b_alpha[:, None] * b_ap
            b_rs_new = tl.sum(b_r * b_r, 1)
            b_z, b_rz_new = precondition(b_r, b_rs_new, b_dinv, PRECOND)
            b_cg_beta = tl.where(b_rz > 0, b_rz_new / tl.where(b_rz > 0, b_rz, 1.), 0.)
            b_p = tl.where(b_active[:, None], b_z + b_cg_beta[:, None] * b_p, b_p)
            if not PRECOND:
                b_pn = tl.where(b_active, b_rs_new + b_cg_beta * b_cg_beta * b_pn, b_pn)
            b_cnt += b_active.to(tl.int32)
            b_rs = tl.where(b_active, b_rs_new, b_rs)
            b_rz = tl.where(b_active, b_rz_new, b_rz)
            i += 1
            todo = tl.max(b_rs - b_thresh, 0) > 0

    if STORE_X:
        tl.store(x + p_tk, b_x, mask=m_tk)
    if STORE_ITERS:
        tl.store(iters + row, b_cnt, mask=m_t)
    if OUTPUT:
        # o_t = exp2(g_t) x_t S_c + sum_{s <= t} (x_t . k_s) exp2(g_t - g_s) beta_s v_s, with the chunk-start
        # state S_c = h_kv [K, V]: the GLA output pass, while x and the chunk's keys are still on chip. Each output
        # row and column gets its own scales (x's and the scores' rows, the values' and the state's columns), so
        # that a token or a value channel far below the others keeps its own relative precision
        b_xq, b_xsc = _scaled_rows(b_x, PDT)
        b_sx, b_sxsc = _scaled_rows(tl.dot(b_xq, tl.trans(b_kq)) * b_decay, PDT)
        b_sxsc = b_xsc * b_sxsc * (b_ksc * b_dsc)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            if V > BV:
                b_v, b_hv = _value_tiles(v, h_kv, row_s, m_s, o_k, m_k, i_state, i_v, K, V, BV)
            b_vq, b_vsc = _scaled_cols(b_v.to(tl.float32), PDT)
            if SCALED_STATES:
                b_hvq = b_hv.to(PDT)
                b_hvsc = tl.load(hvsc + i_state * V + o_v, mask=m_v, other=1.)
            else:
                b_hvq, b_hvsc = _scaled_cols(b_hv, PDT)
            b_o = ((b_xsc * b_eg)[:, None] * b_hvsc[None, :] * tl.dot(b_xq, b_hvq)
                   + b_sxsc[:, None] * b_vsc[None, :] * tl.dot(b_sx, b_vq))
            tl.store(o + row[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


def chunk_cg_solve(
    b: torch.Tensor,
    k: torch.Tensor,
    beta: torch.Tensor,
    gc: torch.Tensor,
    h_kk: torch.Tensor,
    lamb: torch.Tensor,
    cg_steps: int,
    cg_tol: float | None,
    cg_init: str,
    return_iters: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
    v: torch.Tensor | None = None,
    h_kv: torch.Tensor | None = None,
    cg_precond: str = 'none',
    store_x: bool = True,
    adjoint: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    r"""Triton: solves (H_t + diag(lamb)) x_t = b_t for all t by CG, chunk by chunk; with `v` and `h_kv`, also
    the output o_t = G_t x_t from the same kernel.

    Args:
        b: right-hand sides `[B, T, H, K]`, any float dtype. k: keys `[B, T, H, K]`. beta: `[B, T, H]`.
        gc: chunk-local cumulative log2 gate `[B, T, H]` (float32, from `chunk_local_cumsum(..., scale=RCP_LN2)`).
        h_kk: chunk-start states `[B, NT, H, K, K]`, float32. lamb: `[H, K]`. `cg_steps=0` gives x = b.
        v: values `[B, T, H, V]`; h_kv: chunk-start states `[B, NT, H, K, V]` float32 of sum beta k v^T (K <= 128).
        Both states may come as `ScaledStates` instead (float16 values, a float32 scale per column; both
        or neither).
        cg_precond: `'jacobi'` preconditions CG with diag(H_t + diag(lamb)); `'none'`: plain CG.
        store_x: with `v`, False skips writing x (K <= 128; an inference forward needs only o).
        adjoint: the backward's adjoint solve, with `v` and `h_kv` as `ScaledStates` (V = K <= 64): `b` is then the
            output gradient do `[B, T, H, V]`, the right-hand side S_t do_t = G_t^T do_t is formed in the kernel from
            v and h_kv (no round trip of it through memory), and no output is returned.
    Returns:
        x `[B, T, H, K]` float32 (None if not `store_x`), the iterations each token ran (int32 `[B, T, H]`) if
        `return_iters`, and o `[B, T, H, V]` in v's dtype if `v` is given (None with `adjoint`).
    """
    B, T, H, K = b.shape
    if adjoint and (v is None or state_parts(h_kv)[1] is None or v.shape != b.shape or K > 64):
        raise ValueError("chunk_cg_solve: adjoint=True needs `v` of b's shape with K <= 64 and `h_kv` as "
                         f"ScaledStates, got b {tuple(b.shape)}, v {None if v is None else tuple(v.shape)}")
    if K > MAX_KERNEL_K:
        if v is not None:
            raise ValueError(f"chunk_cg_solve: the fused output needs K <= {MAX_KERNEL_K}, got K={K}")
        if cg_steps == 0:
            iters = torch.zeros(B, T, H, dtype=torch.int32, device=b.device) if return_iters else None
            return b.float(), iters, None
        return _solve_wide_heads(b, k, beta, gc, h_kk, lamb, cg_steps, cg_tol, cg_init, return_iters, cu_seqlens,
                                 chunk_size, cg_precond) + (None,)
    (h_kk, hsc), (h_kv, hvsc) = state_parts(h_kk), state_parts(h_kv)
    if (h_kk is not None and v is not None) and ((hsc is None) != (hvsc is None)):
        raise ValueError("chunk_cg_solve: `h_kk` and `h_kv` must both be ScaledStates or both tensors")
    scaled = (hsc if v is None else hvsc) is not None
    NT = triton.cdiv(T, chunk_size) if cu_seqlens is None else len(chunk_indices)
    if not store_x and v is None:
        raise ValueError("chunk_cg_solve: store_x=False needs `v` and `h_kv` (the output is then all it returns)")
    x = torch.empty(B, T, H, K, dtype=torch.float32, device=b.device) if store_x else None
    iters = torch.empty(B, T, H, dtype=torch.int32, device=b.device) if return_iters else None
    V = 1 if v is None else v.shape[-1]
    o = None if v is None or adjoint else torch.empty_like(v)
    cfg = cg_launch_config(K, chunk_size)
    chunk_cg_kernel[(NT * (chunk_size // cfg['BR']), B * H)](
        b, k, beta, gc, h_kk, hsc, lamb.float().contiguous(), x, iters, v, h_kv, hvsc, o, cu_seqlens, chunk_indices,
        tol_sq=cg_threshold(cg_tol, kernel_floor()),
        steps=cg_steps,
        T=T,
        H=H,
        K=K,
        V=V,
        BT=chunk_size,
        BV=OUTPUT_BV,
        PDT=products_dtype(k.dtype),
        SCALED_STATES=scaled,
        SOLVE=cg_steps > 0,
        JACOBI=cg_init == 'jacobi',
        PRECOND=cg_precond == 'jacobi',
        STORE_X=store_x,
        STORE_ITERS=return_iters,
        OUTPUT=o is not None,
        ADJOINT=adjoint,
        IS_VARLEN=cu_seqlens is not None,
        num_stages=1,
        **cfg,
    )
    return x, iters, o


def cg_launch_config(K: int, chunk_size: int = 64) -> dict:
    """`chunk_cg_kernel`'s rows per program BR, key tile BK and warps: the fastest per CG iteration on an H100 of
    16-64 rows and 4 or 8 warps at K = 128 (16 rows, 4 warps) and K = 64 (64 rows, 4 warps), benchmarks/RESULTS.md."""
    BK = max(16, triton.next_power_of_2(K))
    return dict(BR=min(chunk_size, 16 if BK >= 128 else 64), BK=BK, num_warps=4)


def _solve_wide_heads(b, k, beta, gc, h_kk, lamb, cg_steps, cg_tol, cg_init, return_iters, cu_seqlens, chunk_size,
                      cg_precond):
    """K > MAX_KERNEL_K on CUDA: the PyTorch twin on the GPU (cuBLAS products), one padded row per sequence."""
    bounds = [0, b.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    rows = range(b.shape[0]) if cu_seqlens is None else [0] * (len(bounds) - 1)
    spans = list(zip(bounds, bounds[1:])) * (b.shape[0] if cu_seqlens is None else 1)
    xs, its, first = [], [], 0
    for i, (r, (s, e)) in enumerate(zip(rows, spans)):
        nt = -(-(e - s) // chunk_size)
        piece = [pad_to_chunks(t[r:r + 1, s:e].float(), chunk_size) for t in (b, k, beta, gc)]
        h = h_kk[r:r + 1, first:first + nt] if cu_seqlens is not None else h_kk[r:r + 1]
        first += nt if cu_seqlens is not None else 0
        x, it = torch_chunk_cg_solve(piece[0], piece[1], piece[2], piece[3] * math.log(2), h, lamb.float(), cg_steps,
                                     cg_tol, cg_init, return_iters, chunk_size, cg_precond)
        xs.append(x[:, :e - s])
        its.append(it[:, :e - s] if return_iters else None)
    cat = (lambda ts: torch.cat(ts, 1)) if cu_seqlens is not None else (lambda ts: torch.cat(ts, 0))
    return cat(xs), (cat(its) if return_iters else None)


def torch_chunk_cg_solve(b, k, beta, gc, h_kk, lamb, cg_steps, cg_tol, cg_init, return_iters=False, chunk_size=64,
                         cg_precond='none'):
    """PyTorch twin of `chunk_cg_solve` (same algorithm and stopping rule), natural-log `gc`, T a multiple
    of `chunk_size`, every tensor in the compute dtype."""
    kb = beta[..., None] * k
    decay = decay_matrix(gc, chunk_size)

    def matvec(p):
        return chunk_output(p, k, kb, h_kk, gc, chunk_size, decay) + lamb * p

    diag = None
    if cg_init == 'jacobi' or cg_precond == 'jacobi':
        diag = chunk_diag(k, beta, gc, h_kk, chunk_size, decay) + lamb
    x, cnt = torch_cg(b, matvec, diag, cg_steps, cg_threshold(cg_tol, torch.finfo(b.dtype).eps), cg_init, cg_precond)
    return x, (cnt if return_iters else None)


def torch_cg(b, matvec, diag, cg_steps, tol_sq, cg_init, cg_precond):
    """CG for `matvec(x) = b` over the last dim, every leading index its own system: the PyTorch twin of the loop
    in `chunk_cg_kernel` and in the decoding kernel, for the chunked and the recurrent PyTorch paths. `diag` is
    diag(H_t + diag(lamb)), for the Jacobi start and the preconditioner (None if neither is on); a system stops
    once ||r_k||^2 <= tol_sq ||r_0||^2 (`cg_threshold`). Returns x and the iterations each system ran (int32)."""
    x = cg_init_guess(b, diag, cg_init)
    r = b - matvec(x) if cg_init == 'jacobi' else b
    # preconditioned CG with M = diag(H_t + diag(lamb)) when cg_precond == 'jacobi' (z = M^-1 r), plain CG else
    z = r / diag if cg_precond == 'jacobi' else r
    p = z
    rs = (r * r).sum(-1)
    rz = (r * z).sum(-1) if cg_precond == 'jacobi' else rs
    thresh = rs * tol_sq
    cnt = torch.zeros(b.shape[:-1], dtype=torch.int32, device=b.device)
    for _ in range(cg_steps):
        active = rs > thresh  # a system whose residual reached the threshold keeps its x from here on
        if not bool(active.any()):
            break
        ap = matvec(p)
        pap = (p * ap).sum(-1)
        alpha = torch.where(active & (pap > 0), rz / torch.where(pap > 0, pap, 1), 0)[..., None]
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(-1)
        if cg_precond == 'jacobi':
            z = r / diag
            rz_new = (r * z).sum(-1)
        else:
            z, rz_new = r, rs_new
        cg_beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1), 0)[..., None]
        p = torch.where(active[..., None], z + cg_beta * p, p)
        cnt += active.int()
        rs = torch.where(active, rs_new, rs)
        rz = torch.where(active, rz_new, rz)
    return x, cnt
