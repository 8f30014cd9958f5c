"""Token-by-token Mesa for decoding: `fused_recurrent_mesa`.

Every token updates the two states
    H_t = exp(g_t) H_{t-1} + beta_t k_t k_t^T          h_kk [K, K]
    S_t = exp(g_t) S_{t-1} + beta_t k_t v_t^T          h_kv [K, V]   (S_t = G_t^T)
and reads out o_t = S_t^T x_t, where (H_t + diag(lamb)) x_t = q_t is solved by conjugate gradient (CG)
exactly as in `fla_mesa.ops.naive.naive_cg_mesa`, with an optional relative-residual early stop.

On CUDA one Triton program per (sequence, head) runs all the tokens of its sequence; on the CPU the same
algorithm runs in plain PyTorch, batched over sequences and heads (float64 inputs compute in float64).
Forward only: this is the inference (decoding) path; train with `chunk_mesa`.
"""

import contextlib

import torch
import triton
import triton.language as tl

from fla_mesa.ops.cg import precondition, torch_cg
from fla_mesa.ops.utils import cg_threshold, check_inputs, l2norm, step_states


@triton.jit
def _streamed_state_product(p_hkk, b_x, o_k, o_c, o_b, mask_k, K: tl.constexpr, BC: tl.constexpr,
                            NB: tl.constexpr):
    # H x with the symmetric [K, K] state H streamed from p_hkk (L2-resident) in NB row blocks of BC
    b_x2 = tl.reshape(b_x, (NB, BC))
    b_hx = tl.zeros([NB * BC], dtype=tl.float32)
    for i_b in range(NB):
        o_r = i_b * BC + o_c
        m_rk = (o_r < K)[:, None] & mask_k[None, :]
        b_blk = tl.load(p_hkk + o_r[:, None] * K + o_k[None, :], mask=m_rk, other=0.)
        b_xb = tl.sum(tl.where(o_b[:, None] == i_b, b_x2, 0.), 0)
        b_hx += tl.sum(b_blk * b_xb[:, None], 0)
    return b_hx


@triton.jit(do_not_specialize=['T', 'cg_steps', 'cg_tol2'])
def fused_recurrent_mesa_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    lamb,
    o,
    h0_kk,
    h0_kv,
    ht_kk,
    ht_kv,
    iters,
    cu_seqlens,
    T,
    cg_steps,
    cg_tol2,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BC: tl.constexpr,
    BV: tl.constexpr,
    CG_INIT: tl.constexpr,
    PRECOND: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    USE_QK_L2NORM_IN_KERNEL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    STORE_ITERS: tl.constexpr,
):
    # one program per (sequence, head), looping over the tokens of its sequence. The states h_kk [K, K] and
    # h_kv [K, V] are float32 in the output buffers ht_*; the first token reads the initial state h0_* (any
    # float dtype) instead, so h0 is read once and never copied.
    # NB == 1 (K <= 128): h_kk stays in registers as one [BK, BK] tile for all tokens and CG iterations.
    # NB > 1 (K in (128, 256]): h_kk is streamed through ht_kk (L2-resident) in [BC, BK] row blocks, once for
    # its update and once per CG iteration.
    # h_kv is streamed once per token in [BK, BV] tiles: its update, the readout o = h_kv^T x, the store.
    # CG_INIT: 0 = no CG (x = q, cg_steps == 0), 1 = Jacobi start, 2 = zero start. PRECOND: CG preconditioned
    # with diag(H_t) + lamb (z = r / diag), else plain CG.
    NB: tl.constexpr = BK // BC
    i_nh = tl.program_id(0).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = eos - bos
    else:
        bos, eos = i_n * T, i_n * T + T

    o_k = tl.arange(0, BK)
    o_c = tl.arange(0, BC)
    o_b = tl.arange(0, NB)
    o_v = tl.arange(0, BV)
    mask_k = o_k < K

    # padded lanes get lamb = 1 so that the Jacobi start is 0 there (not 0/0) and x, r, p stay 0
    b_lamb = tl.load(lamb + i_h * K + o_k, mask=mask_k, other=1.).to(tl.float32)
    p_hkk = ht_kk + i_nh * K * K
    p_hkv = ht_kv + i_nh * K * V
    if USE_INITIAL_STATE:
        p_h0kk = h0_kk + i_nh * K * K
        p_h0kv = h0_kv + i_nh * K * V
    if NB == 1:
        mask_kk = mask_k[:, None] & mask_k[None, :]
        b_hkk = tl.zeros([BK, BK], dtype=tl.float32)
        if USE_INITIAL_STATE:
            b_hkk += tl.load(p_h0kk + o_k[:, None] * K + o_k[None, :], mask=mask_kk, other=0.).to(tl.float32)

    for i_t in range(0, T):
        i_tok = bos + i_t
        b_q = tl.load(q + (i_tok * H + i_h) * K + o_k, mask=mask_k, other=0.).to(tl.float32)
        b_k = tl.load(k + (i_tok * H + i_h) * K + o_k, mask=mask_k, other=0.).to(tl.float32)
        b_decay = tl.exp(tl.load(g + i_tok * H + i_h).to(tl.float32))
        b_beta = tl.load(beta + i_tok * H + i_h).to(tl.float32)
        if USE_QK_L2NORM_IN_KERNEL:
            # fla's l2norm: x / sqrt(sum(x^2) + eps)
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6)
            b_rk = tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
        else:
            b_rk = 1.
        b_k = b_k * b_rk
        b_bk = b_beta * b_k

        # ---- H_t = exp(g) H_{t-1} + beta k k^T, and its diagonal for the Jacobi start
        if NB == 1:
            b_hkk = b_hkk * b_decay + b_bk[:, None] * b_k[None, :]
            b_diag = tl.sum(tl.where(o_k[:, None] == o_k[None, :], b_hkk, 0.), 0)
        else:
            tl.debug_barrier()
            b_diag = tl.zeros([BK], dtype=tl.float32)
            for i_b in range(NB):
                o_r = i_b * BC + o_c
                m_r = o_r < K
                m_rk = m_r[:, None] & mask_k[None, :]
                b_kr = tl.load(k + (i_tok * H + i_h) * K + o_r, mask=m_r, other=0.).to(tl.float32) * b_rk
                p_blk = p_hkk + o_r[:, None] * K + o_k[None, :]
                # the previous token's H from ht, or the initial state for the first token
                b_blk = tl.load(p_blk, mask=m_rk & (i_t > 0), other=0.)
                if USE_INITIAL_STATE:
                    b_blk += tl.load(p_h0kk + o_r[:, None] * K + o_k[None, :], mask=m_rk & (i_t == 0),
                                     other=0.).to(tl.float32)
                b_blk = b_blk * b_decay + (b_beta * b_kr)[:, None] * b_k[None, :]
                tl.store(p_blk, b_blk, mask=m_rk)
                b_diag += tl.sum(tl.where(o_r[:, None] == o_k[None, :], b_blk, 0.), 0)
            tl.debug_barrier()

        # ---- solve (H_t + diag(lamb)) x = q by CG
        if CG_INIT == 0:
            b_x = b_q
        else:
            b_diag += b_lamb  # diag(H_t + diag(lamb)): the Jacobi start's divisor; its inverse, the preconditioner
            b_dinv = None
            if PRECOND:
                b_dinv = 1. / b_diag
            if CG_INIT == 1:
                b_x = b_q / b_diag
                # r0 = q - (H + diag(lamb)) x0
                if NB == 1:
                    b_Ax = tl.sum(b_hkk * b_x[:, None], 0)
                else:
                    b_Ax = _streamed_state_product(p_hkk, b_x, o_k, o_c, o_b, mask_k, K, BC, NB)
                b_r = b_q - b_Ax - b_lamb * b_x
            else:
                b_x = tl.zeros([BK], dtype=tl.float32)
                b_r = b_q
            b_rs = tl.sum(b_r * b_r)
            b_p, b_rz = precondition(b_r, b_rs, b_dinv, PRECOND)
            # stop once ||r|| <= max(cg_tol, eps) ||r_0|| (cg_tol2 is its square): past the machine-precision
            # floor the recursive residual underflows and CG diverges
            b_thresh = cg_tol2 * b_rs
            i_it = tl.full([], 0, tl.int32)
            while (i_it < cg_steps) & (b_rs > b_thresh):
                if NB == 1:
                    b_Ap = tl.sum(b_hkk * b_p[:, None], 0)
                else:
                    b_Ap = _streamed_state_product(p_hkk, b_p, o_k, o_c, o_b, mask_k, K, BC, NB)
                b_Ap = b_Ap + b_lamb * b_p
                b_pAp = tl.sum(b_p * b_Ap)
                b_alpha = tl.where(b_pAp > 0, b_rz / tl.where(b_pAp > 0, b_pAp, 1.), 0.)
                b_x = b_x + b_alpha * b_p
                b_r = b_r - b_alpha * b_Ap
                b_rs = tl.sum(b_r * b_r)
                b_z, b_rz_new = precondition(b_r, b_rs, b_dinv, PRECOND)
                b_p = b_z + tl.where(b_rz > 0, b_rz_new / tl.where(b_rz > 0, b_rz, 1.), 0.) * b_p
                b_rz = b_rz_new
                i_it += 1
            if STORE_ITERS:
                tl.store(iters + i_tok * H + i_h, i_it)

        # ---- S_t = exp(g) S_{t-1} + beta k v^T and o_t = S_t^T x, tiled over V
        for i_v in range(tl.cdiv(V, BV)):
            o_vv = i_v * BV + o_v
            m_v = o_vv < V
            m_kv = mask_k[:, None] & m_v[None, :]
            b_v = tl.load(v + (i_tok * H + i_h) * V + o_vv, mask=m_v, other=0.).to(tl.float32)
            p_s = p_hkv + o_k[:, None] * V + o_vv[None, :]
            b_s = tl.load(p_s, mask=m_kv & (i_t > 0), other=0.)
            if USE_INITIAL_STATE:
                b_s += tl.load(p_h0kv + o_k[:, None] * V + o_vv[None, :], mask=m_kv & (i_t == 0),
                               other=0.).to(tl.float32)
            b_s = b_s * b_decay + b_bk[:, None] * b_v[None, :]
            tl.store(p_s, b_s, mask=m_kv)
            b_o = tl.sum(b_s * b_x[:, None], 0)
            tl.store(o + (i_tok * H + i_h) * V + o_vv, b_o.to(o.dtype.element_ty), mask=m_v)

    if NB == 1:
        tl.store(p_hkk + o_k[:, None] * K + o_k[None, :], b_hkk, mask=mask_kk)
    if T == 0:
        # an empty sequence: the final state is the initial one (or zeros)
        for i_v in range(tl.cdiv(V, BV)):
            o_vv = i_v * BV + o_v
            m_kv = mask_k[:, None] & (o_vv < V)[None, :]
            b_s = tl.zeros([BK, BV], dtype=tl.float32)
            if USE_INITIAL_STATE:
                b_s += tl.load(p_h0kv + o_k[:, None] * V + o_vv[None, :], mask=m_kv, other=0.).to(tl.float32)
            tl.store(p_hkv + o_k[:, None] * V + o_vv[None, :], b_s, mask=m_kv)
        if NB > 1:
            for i_b in range(NB):
                o_r = i_b * BC + o_c
                m_rk = (o_r < K)[:, None] & mask_k[None, :]
                b_blk = tl.zeros([BC, BK], dtype=tl.float32)
                if USE_INITIAL_STATE:
                    b_blk += tl.load(p_h0kk + o_r[:, None] * K + o_k[None, :], mask=m_rk, other=0.).to(tl.float32)
                tl.store(p_hkk + o_r[:, None] * K + o_k[None, :], b_blk, mask=m_rk)


def kernel_config(K: int, V: int) -> tuple[int, int, int, int]:
    """Tile sizes and warps of the kernel for head dims K, V (<= 256): (BK, BC, BV, num_warps).

    h_kk is one [BK, BK] register tile up to K = 128 (BC = BK), else row blocks of BC = 32 rows streamed
    through L2; h_kv tiles are [BK, BV] with BK * BV <= 8192.
    """
    BK = max(triton.next_power_of_2(K), 16)
    BC = BK if BK <= 128 else 32
    BV = min(max(triton.next_power_of_2(V), 16), max(8192 // BK, 16))
    return BK, BC, BV, 4 if BK <= 64 else 8


def fused_recurrent_mesa_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    lamb: torch.Tensor,
    cg_steps: int = 30,
    cg_tol: float | None = None,
    cg_init: str = 'jacobi',
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    return_cg_iters: bool = False,
    cg_precond: str = 'none',
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """The Triton path (inputs already checked). Returns o (v's dtype), the float32 final state and the
    CG iteration counts (int32 `[B, T, H]`, or None).

    Runs on CPU tensors too when Triton's interpreter is on (`TRITON_INTERPRET=1` before triton is imported).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    q, k, v, g, beta, lamb = (x.contiguous() for x in (q, k, v, g, beta, lamb))
    # the kernel reads the initial state as it is (any float dtype) and writes the float32 final state, which it
    # also uses as its working state (always allocated: the kernel needs it)
    h0_kk, h0_kv = (None, None) if initial_state is None else (s.to(q.device).contiguous() for s in initial_state)
    h_kk = q.new_empty(N, H, K, K, dtype=torch.float32)
    h_kv = q.new_empty(N, H, K, V, dtype=torch.float32)
    o = torch.empty_like(v)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device).contiguous()
    iters = None
    store_iters = return_cg_iters and cg_steps > 0
    if return_cg_iters:
        iters = torch.zeros((B, T, H), dtype=torch.int32, device=q.device)

    BK, BC, BV, num_warps = kernel_config(K, V)
    init = 0 if cg_steps == 0 else {'jacobi': 1, 'zero': 2}[cg_init]
    with torch.cuda.device(q.device.index) if q.is_cuda else contextlib.nullcontext():
        fused_recurrent_mesa_fwd_kernel[(N * H,)](
            q=q,
            k=k,
            v=v,
            g=g,
            beta=beta,
            lamb=lamb,
            o=o,
            h0_kk=h0_kk,
            h0_kv=h0_kv,
            ht_kk=h_kk,
            ht_kv=h_kv,
            iters=iters if store_iters else None,
            cu_seqlens=cu_seqlens,
            T=T,
            cg_steps=cg_steps,
            cg_tol2=cg_threshold(cg_tol, torch.finfo(torch.float32).eps),
            H=H,
            K=K,
            V=V,
            BK=BK,
            BC=BC,
            BV=BV,
            CG_INIT=init,
            PRECOND=cg_precond == 'jacobi',
            USE_INITIAL_STATE=initial_state is not None,
            USE_QK_L2NORM_IN_KERNEL=use_qk_l2norm_in_kernel,
            IS_VARLEN=cu_seqlens is not None,
            STORE_ITERS=store_iters,
            num_warps=num_warps,
            num_stages=1,
        )
    return o, (h_kk, h_kv), iters


def fused_recurrent_mesa_fwd_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    lamb: torch.Tensor,
    cg_steps: int = 30,
    cg_tol: float | None = None,
    cg_init: str = 'jacobi',
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    return_cg_iters: bool = False,
    cg_precond: str = 'none',
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """The PyTorch path (inputs already checked), batched over sequences and heads.

    Computes in float64 for float64 inputs, else in float32. Returns o (v's dtype), the final state in
    the compute dtype and the CG iteration counts (int32 `[B, T, H]`, or None).
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    o_dtype = v.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g, beta, lamb = (x.to(dtype) for x in (q, k, v, g, beta, lamb))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if cu_seqlens is not None:
        # pack the sequences into a padded batch [N, T_max]; padded steps have g = 0 and beta = 0, which leave
        # the states exactly unchanged, and their outputs are dropped
        bounds = cu_seqlens.tolist()
        lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        N, T_pad = len(lens), max(lens, default=0)
        pos = torch.arange(T_pad, device=q.device)
        starts = torch.tensor(bounds[:-1], device=q.device)
        valid = pos[None, :] < torch.tensor(lens, device=q.device)[:, None]
        idx = torch.where(valid, starts[:, None] + pos[None, :], 0)
        q, k, v = q[0, idx], k[0, idx], v[0, idx]
        g = torch.where(valid[..., None], g[0, idx], 0)
        beta = torch.where(valid[..., None], beta[0, idx], 0)
    else:
        N, T_pad = B, T
    if initial_state is None:
        h_kk = q.new_zeros(N, H, K, K)
        h_kv = q.new_zeros(N, H, K, V)
    else:
        h_kk, h_kv = (s.to(device=q.device, dtype=dtype, copy=True) for s in initial_state)

    tol2 = cg_threshold(cg_tol, torch.finfo(dtype).eps)
    outs, counts = [], []
    for t in range(T_pad):
        h_kk, h_kv = step_states(h_kk, h_kv, k[:, t], v[:, t], g[:, t], beta[:, t])
        b = q[:, t]

        def matvec(p):
            # H_t^T p, as fla reads a [K, K] state (H_t is symmetric up to rounding), like the references
            return torch.einsum('nhji,nhj->nhi', h_kk, p) + lamb * p

        if cg_steps == 0:
            x, count = b, torch.zeros(b.shape[:-1], dtype=torch.int32, device=b.device)
        else:
            diag = torch.diagonal(h_kk, dim1=-2, dim2=-1) + lamb
            x, count = torch_cg(b, matvec, diag, cg_steps, tol2, cg_init, cg_precond)
        outs.append(torch.einsum('nhk,nhkv->nhv', x, h_kv))
        counts.append(count)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(N, 0, H, V)
    iters = torch.stack(counts, dim=1) if counts else torch.zeros(N, 0, H, dtype=torch.int32, device=q.device)
    if cu_seqlens is not None:
        o, iters = o[valid][None], iters[valid][None]
    return o.to(o_dtype), (h_kk, h_kv), (iters if return_cg_iters else None)


def fused_recurrent_mesa_fwd(q, k, v, g, beta, lamb, cg_steps, cg_tol, cg_init, initial_state, cu_seqlens,
                             use_qk_l2norm_in_kernel, return_cg_iters, cg_precond):
    fwd = fused_recurrent_mesa_fwd_triton if q.is_cuda else fused_recurrent_mesa_fwd_torch
    return fwd(q=q, k=k, v=v, g=g, beta=beta, lamb=lamb, cg_steps=cg_steps, cg_tol=cg_tol, cg_init=cg_init,
               initial_state=initial_state, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
               return_cg_iters=return_cg_iters, cg_precond=cg_precond)


class FusedRecurrentMesaFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, *args):
        o, (h_kk, h_kv), iters = fused_recurrent_mesa_fwd(*args)
        if iters is not None:
            ctx.mark_non_differentiable(iters)
        return o, h_kk, h_kv, iters

    @staticmethod
    def backward(ctx, do, dh_kk, dh_kv, diters):
        raise NotImplementedError(
            "`fused_recurrent_mesa` is the inference (decoding) path and has no backward; "
            "train with `chunk_mesa`, or run decoding under `torch.no_grad()`.",
        )


@torch.compiler.disable
def fused_recurrent_mesa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    lamb: torch.Tensor,
    cg_steps: int = 30,
    cg_tol: float | None = None,
    cg_init: str = 'jacobi',
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    return_cg_iters: bool = False,
    check_values: bool = True,
    cg_precond: str = 'none',
):
    r"""
    Mesa, token by token: the decoding path (forward only, for inference).

    Per head, with the states h_kk = H [K, K] and h_kv = G^T [K, V]:
        H_t = exp(g_t) H_{t-1} + beta_t k_t k_t^T,   h_kv_t = exp(g_t) h_kv_{t-1} + beta_t k_t v_t^T,
        o_t = h_kv_t^T x_t,   (H_t + diag(lamb)) x_t = q_t solved by conjugate gradient.
    The states are those of `chunk_mesa`, so a `chunk_mesa` prefill continues exactly here.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`.
        g (torch.Tensor):
            log forget gates (<= 0) of shape `[B, T, H]`.
        beta (torch.Tensor):
            input gates of shape `[B, T, H]`.
        lamb (torch.Tensor):
            the regulariser diag(lamb) of shape `[H, K]`, every entry > 0.
        cg_steps (int):
            the most CG iterations per token. `0` skips the solve (x = q: gated linear attention). Default: `30`.
        cg_tol (Optional[float]):
            stop a token's CG once `||r_k|| <= cg_tol * ||r_0||` (r_0: the residual of the start), in (0, 1).
            `None` runs `cg_steps` iterations, or fewer for tokens whose residual reaches the machine-precision
            floor `eps * ||r_0||`. Default: `None`.
        cg_init (str):
            the CG start: `'jacobi'` (x0 = q / (diag(H_t) + lamb), the paper's) or `'zero'`. Default: `'jacobi'`.
        cg_precond (str):
            `'jacobi'`: CG preconditioned with diag(H_t) + lamb, as in `chunk_mesa`; `'none'`: plain CG (the
            paper's). Default: `'none'`.
        initial_state (Optional[Tuple[torch.Tensor, torch.Tensor]]):
            `(h_kk [N, H, K, K], h_kv [N, H, K, V])` for `N` input sequences (float32; any float dtype is cast).
            For equal-length input sequences, `N` equals the batch size `B`. Default: `None` (zeros).
        output_final_state (Optional[bool]):
            Whether to output the final state `(h_kk [N, H, K, K], h_kv [N, H, K, V])`. Default: `False`.
        cu_seqlens (torch.LongTensor):
            Cumulative sequence lengths of shape `[N+1]` used for variable-length inputs (batch size 1),
            consistent with the FlashAttention API.
        use_qk_l2norm_in_kernel (Optional[bool]):
            Whether to l2-normalise q and k (over K) in the kernel (fla's `l2norm`). Default: `False`.
        return_cg_iters (bool):
            also return the CG iterations each token ran (int32 `[B, T, H]`), as in `chunk_mesa`.
            Default: `False`.
        check_values (bool):
            raise if some lamb <= 0 or g > 0, as in `chunk_mesa`: each check waits for the device on CUDA and
            cannot run under CUDA-graph capture. `MesaAttention` passes `False` (both hold by construction).
            Default: `True`.

    Returns:
        o (torch.Tensor):
            Outputs of shape `[B, T, H, V]`, in v's dtype.
        final_state (Optional[Tuple[torch.Tensor, torch.Tensor]]):
            `(h_kk [N, H, K, K], h_kv [N, H, K, V])` in float32 (float64 for float64 inputs on the CPU) if
            `output_final_state=True` else `None`.
        cg_iters (torch.Tensor):
            only if `return_cg_iters`.

    Notes:
        CUDA runs a Triton kernel, one program per (sequence, head): states, CG vectors and residual norms are
        float32 for every input dtype (float64 inputs are refused there), o is rounded to v's dtype at the
        store. The CPU runs the same algorithm in PyTorch, batched over sequences and heads, in float64 for
        float64 inputs. There is no backward: calling `.backward()` through the outputs raises
        `NotImplementedError` (run decoding under `torch.no_grad()`; train with `chunk_mesa`).
        Each token stops at `max(cg_tol, eps) * ||r_0||`: the floor of its float32 products, as `chunk_mesa`'s
        PyTorch path (its CUDA kernel's tf32 or float16 products stop at 2^-16), so a prefill-then-decode agrees
        with one `chunk_mesa` call to rounding.
        A warm start from the previous token's solution is not offered: x_{t-1} solves a system with another
        right-hand side (q_{t-1}), and carrying it would add a third state tensor to the `(h_kk, h_kv)` format.

    Examples::
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from fla_mesa.ops import fused_recurrent_mesa
        >>> B, T, H, K, V = 4, 1, 8, 128, 128
        >>> q = torch.randn(B, T, H, K, device='cuda', dtype=torch.bfloat16)
        >>> k = F.normalize(torch.randn(B, T, H, K, device='cuda'), dim=-1).bfloat16()
        >>> v = torch.randn(B, T, H, V, device='cuda', dtype=torch.bfloat16)
        >>> g = F.logsigmoid(torch.randn(B, T, H, device='cuda'))
        >>> beta = torch.rand(B, T, H, device='cuda')
        >>> lamb = torch.ones(H, K, device='cuda')
        >>> h0 = (torch.zeros(B, H, K, K, device='cuda'), torch.zeros(B, H, K, V, device='cuda'))
        >>> o, ht = fused_recurrent_mesa(q, k, v, g, beta, lamb, initial_state=h0, output_final_state=True)
    """
    check_inputs(q, k, v, g, beta, lamb, initial_state, cu_seqlens, cg_steps, cg_tol, cg_init, check_values,
                 cg_precond)
    if initial_state is not None:
        initial_state = tuple(initial_state)
    args = (q, k, v, g, beta, lamb, cg_steps, cg_tol, cg_init, initial_state, cu_seqlens, use_qk_l2norm_in_kernel,
            return_cg_iters, cg_precond)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, beta, lamb) + (initial_state or ())):
        # through autograd only so that a backward through the outputs raises a clear error
        o, h_kk, h_kv, iters = FusedRecurrentMesaFunction.apply(*args)
    else:
        # decoding: autograd's bookkeeping costs more host time than the kernel at small batch
        o, (h_kk, h_kv), iters = fused_recurrent_mesa_fwd(*args)
    final_state = (h_kk, h_kv) if output_final_state else None
    if return_cg_iters:
        return o, final_state, iters
    return o, final_state
