"""The Mesa backward's per-chunk passes at K = V <= 64 with float16 scaled states: both GLA passes' gradients together.

The backward's two GLA passes (S's: query x, key k, value beta * v, output gradient do; H's: value beta * k, output
gradient -u) share their query, key and gate. `gla_backward`'s kernels run them one after the other, four launches
that each read x, k and the gate again and each form their own score matrices, and S's pass also yields
dx = S_t do_t, the adjoint solve's right-hand side, which H's pass waits on. Here the adjoint CG kernel forms dx
itself (`chunk_cg_solve(..., adjoint=True)`); once u is solved, `mesa_bwd_dk` takes k's gradient as the key and the
gate's for both passes from one ds, and `mesa_bwd_dw` the values' gradients of both from one score matrix, with the
solve's dq = u and dlamb from the same tiles. The query's gradient of both passes, dq_t = S_t do_t - H_t u_t,
enters only the gate's gradient, as x_t . dq_t; since (H_t + diag(lamb)) u_t = S_t do_t, that is
x_t . diag(lamb) u_t, exact for the exact solve, so no product forms it. fla has no such kernels (its MesaNet
backward runs one kernel a side, on bf16 operands).
Products are float32 (tf32) on operands read in their own dtype, as in `gla_backward`; one program holds a chunk's
whole tiles (one program for all of it held too many to be fast: benchmarks/RESULTS.md).

Per chunk (t, s in the chunk, s <= t; G the chunk-local cumulative log2 gate; h, dh a side's chunk-start state and
chunk-end state gradient; w = beta * value; a side's output gradient e: do for S, -u for H):
    ds_ts = 2^(G_t - G_s) sum_sides (e_t . w_s)
    dk_s = 2^(G_last - G_s) sum_sides dh w_s + sum_t ds_ts x_t       (k as the key)
    dw_s = 2^(G_last - G_s) dh^T k_s + sum_t A_st e_t                 (per side: v's as S's value, k's as H's)
    dG_t = x_t . diag(lamb) u_t - k_t . dk_t (+ 2^G_last sum_sides <h, dh> + sum_s k_s . dk_s^(state part) at the
           chunk's last token),
    dg_t = sum_{t' >= t in the chunk} dG_t',
with A_st = 2^(G_t - G_s) k_s . x_t; dG is the gradient with respect to the natural-log chunk-local cumulative gate,
as fla's, and dg the gradient of the log gate g itself.
"""

import torch
import triton
import triton.language as tl

from fla_mesa.ops.chunk_index import chunk_position
from fla_mesa.ops.gla_backward import load_state_tile
from fla_mesa.ops.scaled_states import ScaledStates


@triton.jit
def _load_state(h, hsc, i_state, o_k, m_k, K: tl.constexpr):
    # chunk state i_state's [BK, BK] tile (K = V) in float32, from float16 values times a power of two per column
    return load_state_tile(h, hsc, i_state, o_k, o_k, m_k, m_k, K, K, True)


@triton.jit
def _chunk_program(cu_seqlens, chunk_indices, T, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, IS_VARLEN: tl.constexpr):
    # (this chunk's state index, its rows, their mask, its [BT, BK] tile offsets and mask, its last row, the key mask)
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_tg, bos, T, t0 = chunk_position(i_t, i_b, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)
    o_t = t0 + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t, m_k = o_t < T, o_k < K
    row = (bos + o_t) * H + i_h
    return ((i_tg * H + i_h).to(tl.int64), o_t, row, m_t, row[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :],
            (bos + tl.minimum(t0 + BT, T) - 1) * H + i_h, o_t == tl.minimum(t0 + BT, T) - 1, o_k, m_k)


@triton.jit(do_not_specialize=['T'])
def mesa_bwd_dk_kernel(x, k, v, beta, do, u, lamb, h_kk, hsc_kk, h_kv, hsc_kv, dh_u, dhsc_u, dh_kv, dhsc_kv, gc, dk, dg,
                       cu_seqlens, chunk_indices, T, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                       BK: tl.constexpr, IS_VARLEN: tl.constexpr):
    # one program: one chunk of one head, both sides: k's gradient as the key (float32) and g's. dh_u is the state
    # gradient of +u (H's side has -u): H's terms are subtracted
    i_state, o_t, row, m_t, p_tk, m_tk, r_last, is_last, o_k, m_k = _chunk_program(cu_seqlens, chunk_indices, T, H,
                                                                                   K, BT, BK, IS_VARLEN)
    b_g = tl.load(gc + row, mask=m_t, other=0.)
    b_g_last = tl.load(gc + r_last)
    b_beta = tl.load(beta + row, mask=m_t, other=0.).to(tl.float32)
    # ds and dk's state part over both sides' value columns: S's (+do), then H's (-u)
    b_do = tl.load(do + p_tk, mask=m_tk, other=0.).to(tl.float32)
    b_w = tl.load(v + p_tk, mask=m_tk, other=0.).to(tl.float32) * b_beta[:, None]
    b_dh = _load_state(dh_kv, dhsc_kv, i_state, o_k, m_k, K)
    b_hdh = tl.sum(_load_state(h_kv, hsc_kv, i_state, o_k, m_k, K) * b_dh)
    b_ds = tl.dot(b_do, tl.trans(b_w))
    b_dk = tl.dot(b_w, tl.trans(b_dh))
    b_u = tl.load(u + p_tk, mask=m_tk, other=0.).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.).to(tl.float32)
    b_w = b_k * b_beta[:, None]
    b_dh = _load_state(dh_u, dhsc_u, i_state, o_k, m_k, K)
    b_hdh -= tl.sum(_load_state(h_kk, hsc_kk, i_state, o_k, m_k, K) * b_dh)
    b_ds -= tl.dot(b_u, tl.trans(b_w))
    b_dk -= tl.dot(b_w, tl.trans(b_dh))

    b_x = tl.load(x + p_tk, mask=m_tk, other=0.).to(tl.float32)
    b_dk *= tl.where(m_t, tl.exp2(b_g_last - b_g), 0.)[:, None]
    b_dg_last = b_hdh * tl.exp2(b_g_last) + tl.sum(b_dk * b_k)
    m_ts = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    b_ds = tl.where(m_ts, b_ds * tl.exp2(tl.where(m_ts, b_g[:, None] - b_g[None, :], 0.)), 0.)
    b_dk = tl.dot(tl.trans(b_ds), b_x, b_dk)
    # x_t . dq_t, dq_t = S_t do_t - H_t u_t the query's gradient of both passes, is x_t . diag(lamb) u_t, as
    # (H_t + diag(lamb)) u_t = S_t do_t: exact for the exact solve, and no product with the states needed
    b_lamb = tl.load(lamb + tl.program_id(1) % H * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_dg = tl.sum(b_x * b_u * b_lamb[None, :], 1)
    b_dg -= tl.sum(b_dk * b_k, 1)
    # the gradient of g itself: the chunk-local cumulative gate's, summed from the chunk's end (rows past the
    # sequence's end hold zeros); in the program, which holds the whole chunk, instead of a launch of its own
    b_dg = tl.cumsum(tl.where(is_last, b_dg + b_dg_last, b_dg), 0, reverse=True)
    tl.store(dg + row, b_dg, mask=m_t)
    tl.store(dk + p_tk, b_dk, mask=m_tk)


@triton.jit(do_not_specialize=['T'])
def mesa_bwd_dw_kernel(x, k, v, beta, do, u, dh_u, dhsc_u, dh_kv, dhsc_kv, gc, dk_in, dq, dk, dv, dbeta, dlamb,
                       cu_seqlens, chunk_indices, T, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                       BK: tl.constexpr, IS_VARLEN: tl.constexpr):
    # one program: one chunk of one head, both sides: the values' gradients, S's (v) and H's (k, added to dk_in, the
    # key's), from one score matrix a[s, t] = 2^(G_t - G_s) k_s . x_t; and the solve's dq = u and share of dlamb
    i_state, o_t, row, m_t, p_tk, m_tk, r_last, _, o_k, m_k = _chunk_program(cu_seqlens, chunk_indices, T, H, K, BT,
                                                                             BK, IS_VARLEN)
    b_g = tl.load(gc + row, mask=m_t, other=0.)
    b_decay_last = tl.where(m_t, tl.exp2(tl.load(gc + r_last) - b_g), 0.)
    b_beta = tl.load(beta + row, mask=m_t, other=0.).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.).to(tl.float32)
    b_x = tl.load(x + p_tk, mask=m_tk, other=0.).to(tl.float32)
    m_st = (o_t[:, None] <= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    b_a = tl.dot(b_k, tl.trans(b_x))
    b_a = tl.where(m_st, b_a * tl.exp2(tl.where(m_st, b_g[None, :] - b_g[:, None], 0.)), 0.)
    b_do = tl.load(do + p_tk, mask=m_tk, other=0.).to(tl.float32)
    b_dh = _load_state(dh_kv, dhsc_kv, i_state, o_k, m_k, K)
    b_dw = tl.dot(b_a, b_do, tl.dot(b_k, b_dh) * b_decay_last[:, None])
    b_v = tl.load(v + p_tk, mask=m_tk, other=0.).to(tl.float32)
    tl.store(dv + p_tk, (b_beta[:, None] * b_dw).to(dv.dtype.element_ty), mask=m_tk)
    b_db = tl.sum(b_dw * b_v, 1)
    b_u = tl.load(u + p_tk, mask=m_tk, other=0.).to(tl.float32)
    b_dh = _load_state(dh_u, dhsc_u, i_state, o_k, m_k, K)
    b_dw = tl.dot(b_a, b_u, tl.dot(b_k, b_dh) * b_decay_last[:, None])
    b_dk = tl.load(dk_in + p_tk, mask=m_tk, other=0.) - b_beta[:, None] * b_dw
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dbeta + row, b_db - tl.sum(b_dw * b_k, 1), mask=m_t)
    tl.store(dq + p_tk, b_u.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dlamb + i_state * K + o_k, -tl.sum(b_u * b_x, 0), mask=m_k)


def launch_config() -> dict:
    """The two kernels' warps and stages (one program per chunk, no loop to pipeline): 4 warps; they took 1.8x as long
    at 8 on an H200, 1.6x on an H100 (benchmarks/RESULTS.md)."""
    return dict(num_warps=4, num_stages=1)


def _check(name, k, v, states):
    if k.shape[-1] > 64 or v.shape != k.shape:
        raise ValueError(f"{name}: expected v of k's shape with K <= 64 (one program holds a chunk's whole tiles), got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    for n, s in states.items():
        if not isinstance(s, ScaledStates):
            raise ValueError(f"{name}: `{n}` must be `ScaledStates` (float16 values, a power of two per column)")


def _launch(k, cu_seqlens, chunk_indices, chunk_size):
    # (the grid of one program per chunk and head, the kernels' shared keyword arguments)
    B, T, H, K = k.shape
    grid = (triton.cdiv(T, chunk_size) if cu_seqlens is None else len(chunk_indices), B * H)
    return grid, dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, T=T, H=H, K=K, BT=chunk_size,
                      BK=max(16, triton.next_power_of_2(K)), IS_VARLEN=cu_seqlens is not None, **launch_config())


def mesa_bwd_dk(
    x: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    do: torch.Tensor,
    u: torch.Tensor,
    lamb: torch.Tensor,
    h_kk: ScaledStates,
    h_kv: ScaledStates,
    dh_u: ScaledStates,
    dh_kv: ScaledStates,
    gc: torch.Tensor,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Triton: k's gradient as the key and the gate's, of S's GLA pass (query x, key k, value beta * v, output
    gradient do) and H's (value beta * k, output gradient -u) together, one program per chunk and head.

    Args:
        x: the forward's solve `[B, T, H, K]` float32, K <= 64. k, v: `[B, T, H, K]` (V = K). beta: `[B, T, H]`.
            do: `[B, T, H, K]`. u: the adjoint solve `[B, T, H, K]` float32. lamb: `[H, K]`. Any float dtypes.
        h_kk, h_kv: H's and S's chunk-start states; dh_u, dh_kv: the gradients of the chunk-end states of the passes
            with output gradients +u and do (`chunk_state_grads_bwd`); all `ScaledStates` `[B, NT, H, K, K]`.
        gc: the chunk-local cumulative log2 gate `[B, T, H]` float32. cu_seqlens: `[N + 1]` offsets of packed
            sequences (B = 1) with their `chunk_indices`.
    Returns:
        `(dk_key, dg)`: `[B, T, H, K]` float32, for `mesa_bwd_dw`, and the gradient of the log gate g `[B, T, H]`
        float32.
    """
    _check('mesa_bwd_dk', k, v, dict(h_kk=h_kk, h_kv=h_kv, dh_u=dh_u, dh_kv=dh_kv))
    B, T, H, K = k.shape
    dk = torch.empty(B, T, H, K, dtype=torch.float32, device=k.device)
    dg = torch.empty(B, T, H, dtype=torch.float32, device=k.device)
    grid, kw = _launch(k, cu_seqlens, chunk_indices, chunk_size)
    mesa_bwd_dk_kernel[grid](x, k, v, beta, do, u, lamb, *h_kk, *h_kv, *dh_u, *dh_kv, gc, dk, dg, **kw)
    return dk, dg


def mesa_bwd_dw(
    q: torch.Tensor,
    x: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    do: torch.Tensor,
    u: torch.Tensor,
    dh_u: ScaledStates,
    dh_kv: ScaledStates,
    gc: torch.Tensor,
    dk_key: torch.Tensor,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
):
    r"""Triton: the values' gradients of both GLA passes (as `mesa_bwd_dk`'s), one program per chunk and head: v's
    (S's value) and k's as H's value, added to `dk_key`; with the solve's dq = u and dlamb = -sum u * x.

    Args:
        q: `[B, T, H, K]`: only its dtype, dq's. dk_key: `mesa_bwd_dk`'s. The rest as for `mesa_bwd_dk`.
    Returns:
        `(dq, dk, dv, dbeta, dlamb)`: dq = u in q's dtype, dk and dv in k's and v's, dbeta `[B, T, H]` float32,
        dlamb `[H, K]` float32.
    """
    _check('mesa_bwd_dw', k, v, dict(dh_u=dh_u, dh_kv=dh_kv))
    B, T, H, K = k.shape
    grid, kw = _launch(k, cu_seqlens, chunk_indices, chunk_size)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbeta = torch.empty(B, T, H, dtype=torch.float32, device=k.device)
    # a row of dlamb's partial sums per chunk (over all sequences), summed below
    dlamb = torch.empty(B * grid[0], H, K, dtype=torch.float32, device=k.device)
    mesa_bwd_dw_kernel[grid](x, k, v, beta, do, u, *dh_u, *dh_kv, gc, dk_key, dq, dk, dv, dbeta, dlamb, **kw)
    return dq, dk, dv, dbeta, dlamb.sum(0)
