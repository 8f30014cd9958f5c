"""Chunk-start states of S_t = exp(g_t) S_{t-1} + beta_t k_t v_t^T, in float32, from half-precision k and v.

fla's `chunk_fwd_h` multiplies its operands in their own dtype, so a float32 state of beta * k * k^T needs float32
copies of k and beta * k in memory (6 bytes a value more than bf16 k, and two passes over them); this kernel reads
k, v and beta in their own dtype and forms beta_s * exp2(g_last - g_s) * v_s in float32 in registers (tf32
products, as fla's float32 path). With `scaled=True` it stores each state in float16, one power of two per column
(value channel) in a float32 side tensor: half the bytes for every kernel that reads them, for errors within the
products' own rounding (benchmarks/ops/half_states_emulation.py); the recurrence itself stays float32 in registers.
`chunk_state_pair_fwd` runs H's and S's scans (values k and v) side by side from one launch, for the forward.
`chunk_state_grads_bwd` is the backward's reverse scan, the gradients of the chunk-end states, stored the same way;
`chunk_state_grads_pair_bwd` runs two of them that share their query (x) from one launch, for the Mesa backward.
"""

import torch
import triton
import triton.language as tl

from fla_mesa.ops.cg import _pow2
from fla_mesa.ops.scaled_states import ScaledStates


@triton.jit
def _sequence_span(i_n, cu_seqlens, chunk_offsets, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    # (sequence i_n's first row, its first chunk's index into the chunk states, its length)
    if IS_VARLEN:
        bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = (eos - bos).to(tl.int32)
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = (i_n * T).to(tl.int64)
        boh = (i_n * tl.cdiv(T, BT)).to(tl.int64)
    return bos, boh, T


@triton.jit
def _store_state(b_h, h, hsc, i_state, o_kv, o_v, m_kv, m_v, K: tl.constexpr, V: tl.constexpr, SCALED: tl.constexpr):
    # state i_state's [BK, BV] tile in float32, or (SCALED, the tile holding whole columns: BK == K) in float16 with
    # the power of two at or below each column's largest entry in hsc
    if SCALED:
        b_sc = _pow2(tl.max(tl.abs(b_h), 0))
        tl.store(hsc + i_state * V + o_v, b_sc, mask=m_v)
        tl.store(h + i_state * K * V + o_kv, (b_h * (1. / b_sc)[None, :]).to(tl.float16), mask=m_kv)
    else:
        tl.store(h + i_state * K * V + o_kv, b_h, mask=m_kv)


@triton.jit(do_not_specialize=['T'])
def chunk_states_kernel(
    k,
    v,
    beta,
    gc,
    h0,
    h,
    hsc,
    ht,
    v2,
    h0_2,
    h2,
    hsc2,
    ht2,
    cu_seqlens,
    chunk_offsets,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    SCALED: tl.constexpr,
    PAIR: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if PAIR:
        if i_v >= tl.cdiv(V, BV):  # the second state of the pair (its V is the first's): its own tensors
            i_v -= tl.cdiv(V, BV)
            v = v2
            h = h2
            if USE_INITIAL_STATE:
                h0 = h0_2
            if SCALED:
                hsc = hsc2
            if STORE_FINAL_STATE:
                ht = ht2
    i_n, i_h = i_nh // H, i_nh % H
    bos, boh, T = _sequence_span(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    NT = tl.cdiv(T, BT)

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.).to(tl.float32)

    for i_t in range(NT):
        _store_state(b_h, h, hsc, (boh + i_t) * H + i_h, o_kv, o_v, m_kv, m_v, K, V, SCALED)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        row = (bos + o_t) * H + i_h
        b_k = tl.load(k + row[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.).to(tl.float32)
        b_v = tl.load(v + row[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.).to(tl.float32)
        b_g = tl.load(gc + row, mask=m_t, other=0.).to(tl.float32)
        b_beta = tl.load(beta + row, mask=m_t, other=0.).to(tl.float32)
        b_g_last = tl.load(gc + (bos + tl.minimum((i_t + 1) * BT, T) - 1) * H + i_h).to(tl.float32)
        b_w = tl.where(m_t, tl.exp2(b_g_last - b_g) * b_beta, 0.)
        b_h = tl.dot(b_k, b_v * b_w[:, None], b_h * tl.exp2(b_g_last))

    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)


@triton.jit(do_not_specialize=['T'])
def chunk_state_grads_kernel(q, do, gc, dht, dh, dhsc, dh0, do2, dht2, dh2, dhsc2, dh0_2, cu_seqlens, chunk_offsets, T,
                             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
                             STORE_INITIAL_STATE_GRADIENT: tl.constexpr, PAIR: tl.constexpr, IS_VARLEN: tl.constexpr):
    # one program: BV columns of one sequence's and head's state gradient, all K rows (the column's scale needs them);
    # PAIR: the same columns of a second pass's (output gradient do2) too, from the same loads of q and the gate
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, boh, T = _sequence_span(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    NT = tl.cdiv(T, BT)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_final = i_nh.to(tl.int64) * K * V + o_kv
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh2 = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh = tl.load(dht + p_final, mask=m_kv, other=0.).to(tl.float32)
        if PAIR:
            b_dh2 = tl.load(dht2 + p_final, mask=m_kv, other=0.).to(tl.float32)

    for i_t in range(NT - 1, -1, -1):
        # dh_c, the gradient of chunk c's end state (the start state of chunk c + 1), through the later chunks' outputs
        # and the final state: dh_c-1 = 2^G_last dh_c + sum_t 2^G_t q_t do_t^T over chunk c
        i_state = (boh + i_t) * H + i_h
        _store_state(b_dh, dh, dhsc, i_state, o_kv, o_v, m_kv, m_v, K, V, True)
        if PAIR:
            _store_state(b_dh2, dh2, dhsc2, i_state, o_kv, o_v, m_kv, m_v, K, V, True)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        row = (bos + o_t) * H + i_h
        p_tv = row[:, None] * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_g = tl.load(gc + row, mask=m_t, other=0.).to(tl.float32)
        b_decay_last = tl.exp2(tl.load(gc + (bos + tl.minimum((i_t + 1) * BT, T) - 1) * H + i_h).to(tl.float32))
        b_q = tl.load(q + row[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.).to(tl.float32)
        b_q *= tl.exp2(b_g)[None, :]
        b_dh = tl.dot(b_q, tl.load(do + p_tv, mask=m_tv, other=0.).to(tl.float32), b_dh * b_decay_last)
        if PAIR:
            b_dh2 = tl.dot(b_q, tl.load(do2 + p_tv, mask=m_tv, other=0.).to(tl.float32), b_dh2 * b_decay_last)

    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + p_final, b_dh, mask=m_kv)
        if PAIR:
            tl.store(dh0_2 + p_final, b_dh2, mask=m_kv)


def chunk_state_grads_bwd(
    q: torch.Tensor,
    do: torch.Tensor,
    gc: torch.Tensor,
    dht: torch.Tensor | None = None,
    with_dh0: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
) -> tuple[ScaledStates, torch.Tensor | None]:
    r"""Triton: the gradients of the chunk-end states of a GLA pass o_t = 2^G_t q_t S_c + (in-chunk terms), from
    its output gradient, stored as `ScaledStates` (float16, a power of two per column) for the gradient kernels,
    which multiply them in tf32: float16's 11-bit significand rounded to nearest holds what tf32 keeps of float32
    (fla's `chunk_bwd_dh` stores float32 or the inputs' half dtype only), at half the bytes written and read.

    Args:
        q: the pass's query `[B, T, H, K]` (x), K <= 64. do: `[B, T, H, V]`. Any float dtypes.
        gc: chunk-local cumulative log2 gate `[B, T, H]`. dht: the final states' gradient `[N, H, K, V]` or None.
        with_dh0: also return the initial states' gradient. cu_seqlens: `[N + 1]` offsets of packed sequences (B = 1).
    Returns:
        the chunk-end states' gradients as `ScaledStates` `[B, NT, H, K, V]` (NT: chunks over all sequences when
        varlen), and the initial states' `[N, H, K, V]` float32 if `with_dh0`, else None.
    """
    return _launch_state_grads('chunk_state_grads_bwd', q, [do], gc, [dht], with_dh0, cu_seqlens, chunk_indices,
                               chunk_size)[0]


def chunk_state_grads_pair_bwd(
    q: torch.Tensor,
    do: torch.Tensor,
    do2: torch.Tensor,
    gc: torch.Tensor,
    dht: torch.Tensor | None = None,
    dht2: torch.Tensor | None = None,
    with_dh0: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
) -> list[tuple[ScaledStates, torch.Tensor | None]]:
    r"""Triton: `chunk_state_grads_bwd` of two passes with the same query and gate (output gradients do and do2, of
    one shape) from one launch whose programs read q and the gate once for both: the Mesa backward's S and H passes
    (do and u, query x). The scans move bytes, not products, so sharing the reads of q is what saves time
    (benchmarks/RESULTS.md). Needs both final-state gradients or neither. Returns `((dh, dh0), (dh2, dh0_2))`."""
    if do2.shape != do.shape:
        raise ValueError(f"chunk_state_grads_pair_bwd: expected do2 of do's shape {tuple(do.shape)}, got "
                         f"{tuple(do2.shape)}")
    if (dht is None) != (dht2 is None):
        raise ValueError("chunk_state_grads_pair_bwd: expected both final-state gradients or neither")
    return _launch_state_grads('chunk_state_grads_pair_bwd', q, [do, do2], gc, [dht, dht2], with_dh0, cu_seqlens,
                               chunk_indices, chunk_size)


def _launch_state_grads(name, q, dos, gc, dhts, with_dh0, cu_seqlens, chunk_indices, chunk_size):
    # name: the public function's, for the error
    B, T, H, K = q.shape
    V = dos[0].shape[-1]
    if K > 64:
        raise ValueError(f"{name}: expected K <= 64 (one program holds a whole column), got K={K}")
    N, NT, chunk_offsets = _sequences(B, T, cu_seqlens, chunk_indices, chunk_size)
    outs = [(q.new_empty(B, NT, H, K, V, dtype=torch.float16), q.new_empty(B, NT, H, V, dtype=torch.float32),
             q.new_empty(N, H, K, V, dtype=torch.float32) if with_dh0 else None) for _ in dos]
    pair = len(dos) == 2
    second = (dos[1], dhts[1], *outs[1]) if pair else (None,) * 5
    cfg = state_grads_launch_config(V, pair)
    chunk_state_grads_kernel[(triton.cdiv(V, cfg['BV']), N * H)](
        q, dos[0], gc, dhts[0], *outs[0], *second, cu_seqlens, chunk_offsets,
        T=T,
        H=H,
        K=K,
        V=V,
        BT=chunk_size,
        BK=max(16, triton.next_power_of_2(K)),
        USE_FINAL_STATE_GRADIENT=dhts[0] is not None,
        STORE_INITIAL_STATE_GRADIENT=with_dh0,
        PAIR=pair,
        IS_VARLEN=cu_seqlens is not None,
        **cfg,
    )
    return [(ScaledStates(dh, dhsc), dh0) for dh, dhsc, dh0 in outs]


def state_grads_launch_config(V: int, pair: bool = False) -> dict:
    """`chunk_state_grads_kernel`'s value tile, warps and stages: the fastest of BV in (16, 32, 64), 1-4 warps and 1-3
    stages at K = V = 64 on an H100, for a float32 output gradient (-u) within 5% of the fastest for a bf16 one (do);
    the pair's (do and u) fastest takes 2 stages, 105 us against 141 for two launches (benchmarks/RESULTS.md)."""
    return dict(BV=min(32, max(16, triton.next_power_of_2(V))), num_warps=2, num_stages=2 if pair else 3)


def chunk_states_fwd(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gc: torch.Tensor,
    h0: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
    scaled: bool = False,
) -> tuple[torch.Tensor | ScaledStates, torch.Tensor | None]:
    r"""Triton: the state before each chunk of S_t = exp(g_t) S_{t-1} + beta_t k_t v_t^T, in float32, or in float16
    with a power of two per column (`scaled`, K <= 64).

    Args:
        k: `[B, T, H, K]`. v: `[B, T, H, V]` (pass `k` again for H_t's states). Any float dtype.
        beta: `[B, T, H]`. gc: chunk-local cumulative log2 gate `[B, T, H]` (`chunk_local_cumsum(..., scale=RCP_LN2)`).
        h0: initial states `[N, H, K, V]` or None. cu_seqlens: `[N + 1]` offsets of packed sequences (B = 1), with
        their `prepare_chunk_indices(cu_seqlens, chunk_size)` if the caller has them.
        scaled: store the chunk-start states as `ScaledStates` (K <= 64, so that one program holds a whole column).
    Returns:
        chunk-start states `[B, NT, H, K, V]` float32, or `ScaledStates` if `scaled` (NT: chunks over all sequences
        when varlen), and the final states `[N, H, K, V]` float32 if `output_final_state`, else None.
    """
    return _chunk_states(k, [v], beta, gc, [h0], output_final_state, cu_seqlens, chunk_indices, chunk_size,
                         scaled)[0]


def chunk_state_pair_fwd(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gc: torch.Tensor,
    h0_kk: torch.Tensor | None = None,
    h0_kv: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
    scaled: bool = False,
):
    r"""Triton: H's and S's chunk states (values k and v) from one launch, whose programs run both scans side by
    side: `chunk_states_fwd(k, k, ...)` and `chunk_states_fwd(k, v, ...)` in one. Needs v of k's shape and dtype, and
    both initial states or neither. Returns `((h_kk, ht_kk), (h_kv, ht_kv))`."""
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"chunk_state_pair_fwd: expected v of k's shape and dtype {tuple(k.shape)} {k.dtype}, got "
                         f"{tuple(v.shape)} {v.dtype}")
    if (h0_kk is None) != (h0_kv is None):
        raise ValueError("chunk_state_pair_fwd: expected both initial states or neither")
    h0s = [None, None] if h0_kk is None else [h0_kk.float(), h0_kv.float()]  # one pointer type for both
    return _chunk_states(k, [k, v], beta, gc, h0s, output_final_state, cu_seqlens, chunk_indices, chunk_size, scaled)


def _sequences(B, T, cu_seqlens, chunk_indices, chunk_size):
    """(sequences N, chunk states NT a batch row holds, each sequence's first chunk state or None) of the fixed-length
    or the packed layout."""
    from fla.ops.utils import prepare_chunk_indices, prepare_chunk_offsets
    if cu_seqlens is None:
        return B, triton.cdiv(T, chunk_size), None
    if chunk_indices is None:
        chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)
    return len(cu_seqlens) - 1, len(chunk_indices), prepare_chunk_offsets(cu_seqlens, chunk_size)


def _chunk_states(k, vs, beta, gc, h0s, output_final_state, cu_seqlens, chunk_indices, chunk_size, scaled):
    B, T, H, K = k.shape
    V = vs[0].shape[-1]
    N, NT, chunk_offsets = _sequences(B, T, cu_seqlens, chunk_indices, chunk_size)
    if scaled and K > 64:
        raise ValueError(f"chunk_states_fwd: scaled states need K <= 64, got K={K}")
    outs = [(k.new_empty(B, NT, H, K, V, dtype=torch.float16 if scaled else torch.float32),
             k.new_empty(B, NT, H, V, dtype=torch.float32) if scaled else None,
             k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None) for _ in vs]
    second = (vs[1], h0s[1], *outs[1]) if len(vs) == 2 else (None,) * 5
    cfg = states_launch_config(K, V, pair=len(vs) == 2)
    chunk_states_kernel[(triton.cdiv(K, cfg['BK']), triton.cdiv(V, cfg['BV']) * len(vs), N * H)](
        k, vs[0], beta, gc, h0s[0], *outs[0], *second, cu_seqlens, chunk_offsets,
        T=T,
        H=H,
        K=K,
        V=V,
        BT=chunk_size,
        USE_INITIAL_STATE=h0s[0] is not None,
        STORE_FINAL_STATE=output_final_state,
        SCALED=scaled,
        PAIR=len(vs) == 2,
        IS_VARLEN=cu_seqlens is not None,
        **cfg,
    )
    return [((ScaledStates(h, hsc) if scaled else h), ht) for h, hsc, ht in outs]


def states_launch_config(K: int, V: int, pair: bool = False) -> dict:
    """`chunk_states_kernel`'s tiles, warps and stages: the fastest of BK, BV in (32, 64), 2-8 warps and 1-3 stages
    at K = V = 128 and 64 on an H100; at 64 (timed with float16 states), the pair's fastest BV is 64, the single
    state's 32 (benchmarks/RESULTS.md, `benchmark_states.py`)."""
    return dict(BK=min(64, max(16, triton.next_power_of_2(K))), BV=64 if V >= 128 or (pair and V >= 64) else 32,
                num_warps=2, num_stages=2 if K >= 128 else 3)
