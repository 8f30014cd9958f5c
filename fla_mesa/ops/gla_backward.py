"""The GLA backward's per-chunk gradients on half-precision operands with float32 products, both sides in place.

The backward's two GLA passes (S's: query x, key k, value beta * v, output gradient do; H's: value beta * k, output
gradient -u) need float32 products for gradients as accurate as fla's MesaNet's (benchmarks/RESULTS.md), and fla's
`chunk_bwd_dqkwg` / `chunk_bwd_dv` multiply their operands in the operands' own dtype, so with fla they took float32
copies of k, beta * k, beta * v and do in memory. These two kernels read each operand in its own dtype (bf16 k, v, do;
float32 x, u and states), form beta * v in registers, multiply in float32 (tf32 tensor cores) and add H's side's
gradients into S's buffers, so no copy and no partial gradient of one side is kept. The state gradients come from
fla's `chunk_bwd_dh` (float32; it already casts do to x's dtype itself) or, scaled, from `chunk_state_grads_bwd`.

Per chunk of BT tokens (t, s in the chunk, s <= t), with G the chunk-local cumulative log2 gate, w = beta * value, h
the chunk-start state and dh the gradient of the chunk-end state:
    dq_t = 2^G_t h do_t + sum_s 2^(G_t - G_s) (do_t . w_s) k_s
    dk_s = 2^(G_last - G_s) dh w_s + sum_t 2^(G_t - G_s) (do_t . w_s) q_t
    dw_s = 2^(G_last - G_s) dh^T k_s + sum_t 2^(G_t - G_s) (q_t . k_s) do_t
    dG_t = q_t . dq_t - k_t . dk_t (+ 2^G_last <h, dh> + sum_s k_s . dk_s^(state part) at the chunk's last token),
the gradient with respect to the natural-log chunk-local cumulative gate, as fla's.
"""

import torch
import triton
import triton.language as tl

from fla_mesa.ops.chunk_index import chunk_position
from fla_mesa.ops.scaled_states import state_parts


@triton.jit
def load_state_tile(h, hsc, i_state, o_k, o_v, m_k, m_v, K: tl.constexpr, V: tl.constexpr, SCALED: tl.constexpr):
    # chunk state i_state's [rows o_k, columns o_v] tile in float32: as stored, or (SCALED, `ScaledStates`) float16
    # values times a power of two per column
    b_h = tl.load(h + i_state * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :],
                  other=0.).to(tl.float32)
    if SCALED:
        b_h *= tl.load(hsc + i_state * V + o_v, mask=m_v, other=0.)[None, :]
    return b_h


@triton.jit(do_not_specialize=['T'])
def gla_bwd_dqkg_kernel(q, k, w_src, beta, do, h, hsc, dh, dhsc, gc, dq, dk, dg, cu_seqlens, chunk_indices, T, n_rows,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, STORE_DQ: tl.constexpr, ACCUMULATE: tl.constexpr, NEGATE: tl.constexpr,
                        SCALED_STATES: tl.constexpr, SCALED_DH: tl.constexpr, IS_VARLEN: tl.constexpr):
    # one program: BK key columns of one chunk of one head; dq, dk [rows, BK] and this block's share of dG
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_tg, bos, T, t0 = chunk_position(i_t, i_b, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)
    o_t = t0 + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t, m_k = o_t < T, o_k < K
    row = (bos + o_t) * H + i_h
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = row[:, None] * K + o_k[None, :]
    i_state = (i_tg * H + i_h).to(tl.int64)  # the chunk's and head's states

    b_g = tl.load(gc + row, mask=m_t, other=0.)
    b_g_last = tl.load(gc + (bos + tl.minimum(t0 + BT, T) - 1) * H + i_h)
    b_beta = tl.load(beta + row, mask=m_t, other=0.).to(tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = row[:, None] * V + o_v[None, :]
        b_w = tl.load(w_src + p_tv, mask=m_tv, other=0.).to(tl.float32) * b_beta[:, None]
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.).to(tl.float32)
        b_h = load_state_tile(h, hsc, i_state, o_k, o_v, m_k, m_v, K, V, SCALED_STATES)
        b_dh = load_state_tile(dh, dhsc, i_state, o_k, o_v, m_k, m_v, K, V, SCALED_DH)
        b_hdh += tl.sum(b_h * b_dh, 1)
        b_ds += tl.dot(b_do, tl.trans(b_w))
        b_dq += tl.dot(b_do, tl.trans(b_h))
        b_dk += tl.dot(b_w, tl.trans(b_dh))

    b_q = tl.load(q + p_tk, mask=m_tk, other=0.).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.).to(tl.float32)
    b_dq *= tl.exp2(b_g)[:, None]
    b_dk *= tl.where(m_t, tl.exp2(b_g_last - b_g), 0.)[:, None]
    b_dg_last = tl.sum(b_hdh) * tl.exp2(b_g_last) + tl.sum(b_dk * b_k)
    m_ts = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    b_ds = tl.where(m_ts, b_ds * tl.exp2(tl.where(m_ts, b_g[:, None] - b_g[None, :], 0.)), 0.)
    b_dq += tl.dot(b_ds, b_k)
    b_dk += tl.dot(tl.trans(b_ds), b_q)
    b_dg = tl.sum(b_dq * b_q, 1) - tl.sum(b_dk * b_k, 1)
    b_dg = tl.where(o_t == tl.minimum(t0 + BT, T) - 1, b_dg + b_dg_last, b_dg)
    if NEGATE:
        b_dq, b_dk, b_dg = -b_dq, -b_dk, -b_dg
    if STORE_DQ:
        tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    p_dg = dg + i_k * n_rows + row
    if ACCUMULATE:
        b_dk += tl.load(dk + p_tk, mask=m_tk, other=0.)
        b_dg += tl.load(p_dg, mask=m_t, other=0.)
    tl.store(dk + p_tk, b_dk, mask=m_tk)
    tl.store(p_dg, b_dg, mask=m_t)


@triton.jit(do_not_specialize=['T'])
def gla_bwd_dw_kernel(q, k, w_src, beta, do, dh, dhsc, gc, dw_in, dw_out, dbeta, cu_seqlens, chunk_indices, T, n_rows,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, ACCUMULATE: tl.constexpr, NEGATE: tl.constexpr, SCALED_DH: tl.constexpr,
                      IS_VARLEN: tl.constexpr):
    # one program: BV value columns of one chunk of one head. dw, the gradient of w = beta * w_src, goes out as
    # beta * dw, the gradient of w_src (stored in dw_out, or with dw_in added: dw_in may be dw_out), and as this
    # block's share of dbeta = sum_V dw * w_src (added to dbeta)
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_tg, bos, T, t0 = chunk_position(i_t, i_b, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)
    o_t = t0 + tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < T, o_v < V
    row = (bos + o_t) * H + i_h
    m_tv = m_t[:, None] & m_v[None, :]
    p_tv = row[:, None] * V + o_v[None, :]
    i_state = (i_tg * H + i_h).to(tl.int64)  # the chunk's and head's states
    p_state = i_state * K * V

    b_g = tl.load(gc + row, mask=m_t, other=0.)
    b_g_last = tl.load(gc + (bos + tl.minimum(t0 + BT, T) - 1) * H + i_h)
    # the tiles used after the key loop load before it, their latency hidden behind its products (2-3% faster
    # gradient kernels on an H200, benchmarks/RESULTS.md)
    b_do = tl.load(do + p_tv, mask=m_tv, other=0.)
    b_beta = tl.load(beta + row, mask=m_t, other=0.).to(tl.float32)
    b_src = tl.load(w_src + p_tv, mask=m_tv, other=0.)
    b_dw = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)  # b_a[s, t] = k_s . q_t
    if SCALED_DH:
        b_dhsc = tl.load(dhsc + i_state * V + o_v, mask=m_v, other=0.)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = row[:, None] * K + o_k[None, :]
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.).to(tl.float32)
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.).to(tl.float32)
        b_dh = tl.load(dh + p_state + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :],
                       other=0.).to(tl.float32)
        if SCALED_DH:
            b_dh *= b_dhsc[None, :]
        b_dw += tl.dot(b_k, b_dh)
        b_a += tl.dot(b_k, tl.trans(b_q))
    b_dw *= tl.where(m_t, tl.exp2(b_g_last - b_g), 0.)[:, None]
    m_st = (o_t[:, None] <= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    b_a = tl.where(m_st, b_a * tl.exp2(tl.where(m_st, b_g[None, :] - b_g[:, None], 0.)), 0.)
    b_dw += tl.dot(b_a, b_do.to(tl.float32))
    if NEGATE:
        b_dw = -b_dw
    b_src = b_src.to(tl.float32)
    b_dsrc = b_beta[:, None] * b_dw
    b_db = tl.sum(b_dw * b_src, 1)
    p_db = dbeta + i_v * n_rows + row
    b_db += tl.load(p_db, mask=m_t, other=0.)  # zeros from the first call: the two sides' V blocks may differ
    if ACCUMULATE:
        b_dsrc += tl.load(dw_in + p_tv, mask=m_tv, other=0.).to(tl.float32)
    tl.store(dw_out + p_tv, b_dsrc.to(dw_out.dtype.element_ty), mask=m_tv)
    tl.store(p_db, b_db, mask=m_t)


def _tile(n: int, cap: int = 64) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


def launch_configs(K: int, V: int) -> tuple[dict, dict]:
    """The launch settings of `gla_bwd_dqkg_kernel` and `gla_bwd_dw_kernel`: of sweeps on an H200 and an H100 (key
    and value tiles 32-128, 4 or 8 warps, 1-3 stages; `benchmarks/ops/benchmark_gla_bwd.py`), the fastest for the
    two sides' calls together, or within 0.3% of it, at K = V = 128 and at K = V = 64 on both. `dw` takes all of K
    in one tile, up to 128."""
    return (dict(BK=_tile(K), BV=_tile(V, 32), num_warps=4, num_stages=2),
            dict(BK=_tile(K, 128), BV=_tile(V), num_warps=4, num_stages=2))


def chunk_gla_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    do: torch.Tensor,
    h: torch.Tensor,
    dh: torch.Tensor,
    gc: torch.Tensor,
    acc: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    negate: bool = False,
    with_dq: bool = True,
    dv_out: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
):
    r"""Triton: the per-chunk gradients of the GLA pass o = GLA(query q, key k, value beta * v), float32 products.

    Args:
        q: `[B, T, H, K]` (x, float32). k: `[B, T, H, K]`. v: the value's source `[B, T, H, V]`. beta: `[B, T, H]`.
        do: the output gradient `[B, T, H, V]`. Any float dtypes.
        h: chunk-start states `[B, NT, H, K, V]` float32, or `ScaledStates`; dh: the gradients of the
            chunk-end states `[B, NT, H, K, V]` float32 (fla's `chunk_bwd_dh`), or `ScaledStates`
            (`chunk_state_grads_bwd`). gc: the chunk-local cumulative
            log2 gate `[B, T, H]` float32.
        acc: None, or `(dv, dk, dg, dbeta)` of an earlier call: this pass's gradients are added to them in place, v's
            gradient to `dv` (pass the earlier `dk` as `dv` when v is k).
        negate: return the gradients of -do (the caller passes dh of -do as well).
        with_dq: compute q's gradient.
        dv_out: where v's gradient goes, `[B, T, H, V]` in any float dtype (default: a new tensor in v's dtype, or
            `acc`'s `dv`, in place). The backward's last pass stores k's gradient there in k's dtype, with no cast.
    Returns:
        `(dq, dv, dk, dg, dbeta)`: dq `[B, T, H, K]` float32 or None; dv, v's gradient `beta * dw` (plus `acc`'s
        dv), in `dv_out` or as the default above; dk `[B, T, H, K]` float32; dg `[NK, B * T * H]` float32, the
        gradient of the natural-log chunk-local cumulative gate in sums over key blocks; dbeta `[NV, B * T * H]`
        float32 in sums over value blocks (take `.sum(0)` of both).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    (h, hsc), (dh, dhsc) = state_parts(h), state_parts(dh)
    NT = triton.cdiv(T, chunk_size) if cu_seqlens is None else len(chunk_indices)
    n_rows = B * T * H
    dqkg, dw = launch_configs(K, V)
    if dv_out is not None and dv_out.shape != v.shape:
        raise ValueError(f"chunk_gla_bwd: `dv_out` must have v's shape {tuple(v.shape)}, got {tuple(dv_out.shape)}")
    if acc is None:
        dv_in = None
        dk = torch.empty(B, T, H, K, dtype=torch.float32, device=k.device)
        dg = torch.empty(triton.cdiv(K, dqkg['BK']), n_rows, dtype=torch.float32, device=k.device)
        # a row per value block of either side (H's, value k, adds into this buffer)
        dbeta = torch.zeros(triton.cdiv(max(K, V), dw['BV']), n_rows, dtype=torch.float32, device=k.device)
    else:
        dv_in, dk, dg, dbeta = acc
    dv = dv_out if dv_out is not None else torch.empty_like(v) if dv_in is None else dv_in
    dq = torch.empty(B, T, H, K, dtype=torch.float32, device=k.device) if with_dq else None
    common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, T=T, n_rows=n_rows, H=H, K=K, V=V,
                  BT=chunk_size, NEGATE=negate, IS_VARLEN=cu_seqlens is not None)
    gla_bwd_dqkg_kernel[(triton.cdiv(K, dqkg['BK']), NT, B * H)](q, k, v, beta, do, h, hsc, dh, dhsc, gc, dq, dk,
                                                                  dg, STORE_DQ=with_dq, ACCUMULATE=acc is not None,
                                                                  SCALED_STATES=hsc is not None,
                                                                  SCALED_DH=dhsc is not None, **common, **dqkg)
    gla_bwd_dw_kernel[(triton.cdiv(V, dw['BV']), NT, B * H)](q, k, v, beta, do, dh, dhsc, gc,
                                                             dv if dv_in is None else dv_in, dv, dbeta,
                                                             ACCUMULATE=acc is not None, SCALED_DH=dhsc is not None,
                                                             **common, **dw)
    return dq, dv, dk, dg, dbeta
