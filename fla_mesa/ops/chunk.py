"""Chunked Mesa: forward by CG over chunk states, backward by implicit differentiation.

Forward (per head): chunk-start states of H and of S = G^T (`chunk_state_pair_fwd`: float32, or float16 with a power of
two per column for half-precision inputs at K <= 64, `scaled_states`); x = (H_t + diag(lamb))^{-1} q_t for all t by
`chunk_cg_solve`, which also takes o = the GLA output pass with query x, key k, value beta * v while x is on chip.
Backward: dx = S_t do_t and the S-side gradients from one GLA backward; u = (H_t + diag(lamb))^{-1} dx_t by one more CG
solve; the H-side gradients from one GLA backward with "output gradient" -u (since dH_t = -u_t x_t^T); dq = u; dlamb =
-sum_t u_t * x_t. Nothing is differentiated through the CG iterations: the gradients are those of the exact solve.
On CUDA the state gradients of both GLA passes come from fla's `chunk_bwd_dh` (float32) or, where the states are
scaled, from our reverse scan (stored as the states are), beside the chunk states of our state kernel recomputed as
the forward stored them (float32 for fla's primitives, `fp32_backward=False`). The per-chunk
gradients come from our `gla_backward` kernels (the default `fp32_backward`: half-precision operands read as they are,
float32 products, H's side added in place), or from fla's `chunk_bwd_dqkwg` / `chunk_bwd_dv` on operands in the inputs'
dtype with our `elementwise` casts and sums around them (`fp32_backward=False`); elsewhere every pass is `torch_chunk`'s
PyTorch twin. At K = V <= 64 with scaled states and CG steps, the adjoint CG kernel forms dx from do itself, one
launch scans both passes' state gradients, and `mesa_backward`'s kernels take both passes' gradients together
(`_fused_bwd`).
"""

import torch
from torch.nn.utils.rnn import pad_sequence

from fla_mesa.ops import cg
from fla_mesa.ops.cg import MAX_KERNEL_K, chunk_cg_solve, torch_chunk_cg_solve
from fla_mesa.ops.elementwise import bwd_combine, bwd_prep, bwd_solve
from fla_mesa.ops.gla_backward import chunk_gla_bwd
from fla_mesa.ops.mesa_backward import mesa_bwd_dk, mesa_bwd_dw
from fla_mesa.ops.states import (chunk_state_grads_bwd, chunk_state_grads_pair_bwd, chunk_state_pair_fwd,
                                 chunk_states_fwd)
from fla_mesa.ops.torch_chunk import chunk_cumsum, chunk_output, chunk_states, pad_to_chunks
from fla_mesa.ops.tuning import narrow_fla_autotune
from fla_mesa.ops.utils import check_inputs, l2norm


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def adjoint_init(cg_init, cg_tol):
    """The backward's solve's start: x_0 = 0 where it runs to the precision floor (`cg_tol=None`), the forward's
    `cg_init` under a tolerance. At the floor both starts end at the products' rounding, and the Jacobi start's
    diagonal and system product cost more than the iterations it saves (benchmarks/RESULTS.md, thirty-fourth
    session); under a tolerance relative to ||r_0||, the start sets how far CG goes."""
    return 'zero' if cg_tol is None else cg_init


def _torch_fwd(q, k, v, g, beta, lamb, h0_kk, h0_kv, cg_steps, cg_tol, cg_init, return_iters, chunk_size, cg_precond):
    T, dt = q.shape[1], _compute_dtype(q.dtype)
    q, k, v, g, beta = (pad_to_chunks(x.to(dt), chunk_size) for x in (q, k, v, g, beta))
    gc = chunk_cumsum(g, chunk_size)
    h_kk, ht_kk = chunk_states(k, beta[..., None] * k, gc, h0_kk, chunk_size)
    if cg_steps == 0:
        x, iters = q, (torch.zeros(q.shape[:3], dtype=torch.int32) if return_iters else None)
    else:
        x, iters = torch_chunk_cg_solve(q, k, beta, gc, h_kk, lamb.to(dt), cg_steps, cg_tol, cg_init,
                                        return_iters, chunk_size, cg_precond)
    vb = beta[..., None] * v
    h_kv, ht_kv = chunk_states(k, vb, gc, h0_kv, chunk_size)
    o = chunk_output(x, k, vb, h_kv, gc, chunk_size)
    return o[:, :T], ht_kk, ht_kv, x[:, :T], (iters[:, :T] if return_iters else None)


def _torch_bwd(q, k, v, g, beta, lamb, h0_kk, h0_kv, x, do, dht_kk, dht_kv, cg_steps, cg_tol, cg_init, chunk_size,
               cg_precond):
    dt = _compute_dtype(q.dtype)
    leaves = [t.detach().to(dt).requires_grad_() for t in (k, v, g, beta)]
    states = [None if h is None else h.detach().to(dt).requires_grad_() for h in (h0_kk, h0_kv)]
    with torch.enable_grad():
        k_, v_, g_, beta_ = (pad_to_chunks(t, chunk_size) for t in leaves)
        x_ = pad_to_chunks(x.to(dt), chunk_size).requires_grad_()
        gc = chunk_cumsum(g_, chunk_size)
        vb = beta_[..., None] * v_
        h_kv, ht_kv = chunk_states(k_, vb, gc, states[1], chunk_size)
        o = chunk_output(x_, k_, vb, h_kv, gc, chunk_size)
        do_ = pad_to_chunks(do.to(dt), chunk_size)
        dx, = torch.autograd.grad(o, x_, do_, retain_graph=True)
        kb = beta_[..., None] * k_
        h_kk, ht_kk = chunk_states(k_, kb, gc, states[0], chunk_size)
        if cg_steps == 0:
            u, dq = torch.zeros_like(dx), dx
        else:
            u, _ = torch_chunk_cg_solve(dx, k_.detach(), beta_.detach(), gc.detach(), h_kk.detach(), lamb.to(dt),
                                        cg_steps, cg_tol, adjoint_init(cg_init, cg_tol), chunk_size=chunk_size,
                                        cg_precond=cg_precond)
            dq = u
        y = chunk_output(x_.detach(), k_, kb, h_kk, gc, chunk_size)
        total = (o * do_).sum() - (y * u).sum()
        for ht, dht in ((ht_kk, dht_kk), (ht_kv, dht_kv)):
            if dht is not None:
                total = total + (ht * dht.to(dt)).sum()
        wrt = leaves + [s for s in states if s is not None]
        grads = list(torch.autograd.grad(total, wrt, allow_unused=True))
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(wrt, grads)]
    dk, dv, dg, dbeta = grads[:4]
    rest = iter(grads[4:])
    dh0_kk, dh0_kv = (None if s is None else next(rest) for s in states)
    T = q.shape[1]
    u, dq = u[:, :T], dq[:, :T]
    dlamb = -(u * x.to(dt)).sum((0, 1))
    return dq, dk, dv, dg, dbeta, dlamb, dh0_kk, dh0_kv


def _cuda_fwd(q, k, v, g, beta, lamb, h0_kk, h0_kv, cg_steps, cg_tol, cg_init, return_iters, output_final_state,
              cu_seqlens, chunk_indices, chunk_size, cg_precond, save_x=True):
    from fla.ops.common.chunk_o import chunk_fwd_o
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    gc = chunk_local_cumsum(g, chunk_size=chunk_size, scale=RCP_LN2, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
    # float32 states and products (tf32, unit roundoff 2^-11) rather than rounding beta * k, beta * v, the states
    # and x to a half dtype (2^-9 for bf16) at every product: each such rounding adds about the output's own
    # rounding error. Half-precision inputs at K <= 64 get float16 states with a scale per column (`scaled_states`)
    states = dict(output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
                  chunk_size=chunk_size, scaled=scaled_states(k))
    h_kk = ht_kk = None
    if (cg_steps > 0 or output_final_state) and v.shape == k.shape:  # both scans from one launch
        (h_kk, ht_kk), (h_kv, ht_kv) = chunk_state_pair_fwd(k, v, beta, gc, h0_kk, h0_kv, **states)
    else:
        if cg_steps > 0 or output_final_state:  # gated linear attention (no CG) needs H only for its final state
            h_kk, ht_kk = chunk_states_fwd(k, k, beta, gc, h0_kk, **states)
        h_kv, ht_kv = chunk_states_fwd(k, v, beta, gc, h0_kv, **states)
    solve = (q, k, beta, gc, h_kk, lamb, cg_steps, cg_tol, cg_init, return_iters, cu_seqlens, chunk_indices, chunk_size)
    if k.shape[-1] <= MAX_KERNEL_K:
        x, iters, o = chunk_cg_solve(*solve, v=v, h_kv=h_kv, cg_precond=cg_precond, store_x=save_x)
    else:  # wide heads: the solve on cuBLAS (see chunk_cg_solve), the output from fla's pass on float32 operands
        x, iters, _ = chunk_cg_solve(*solve, cg_precond=cg_precond)
        del h_kk
        o = chunk_fwd_o(q=x, k=k.float(), v=v.float() * beta[..., None].float(), h=h_kv, g=gc, scale=1.0,
                        cu_seqlens=cu_seqlens, chunk_size=chunk_size, chunk_indices=chunk_indices)
    return o, ht_kk, ht_kv, x, iters, gc


def scaled_states(k):
    """Whether the CUDA path stores its chunk states as `ScaledStates` (float16, a power of two per column): for
    bf16 and float16 inputs at K <= 64, where the passes around CG decide the speed, with the CG kernel's float16
    products (`cg.products_dtype`); float32 inputs, and every input under `cg.full_products()`, keep float32 states."""
    return k.dtype in (torch.bfloat16, torch.float16) and k.shape[-1] <= 64 and not cg.full_products()


def _gla_bwd(q, k, v, h, h0, do, dht, g, cu_seqlens, chunk_indices, chunk_size):
    """fla's `chunk_simple_gla_bwd` on chunk states `h` [B, NT, H, K, V] float32 that the caller already has, instead
    of recomputing them (fla has no entry point that takes them): returns dq, dk, dv, dg (chunk-local), dh0."""
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv

    common = dict(g=g, g_gamma=None, scale=1.0, cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    dh, dh0 = _state_grads(q, k, v, do, h0, dht, g, cu_seqlens, chunk_size)
    dq, dk, _, dg = chunk_bwd_dqkwg(q=q, k=k, v=v, do=do, h=h, dh=dh, chunk_indices=chunk_indices, **common)
    dv = chunk_bwd_dv(q=q, k=k, do=do, dh=dh, chunk_indices=chunk_indices, **common)
    return dq, dk, dv, dg, dh0


def _state_grads(q, k, v, do, h0, dht, g, cu_seqlens, chunk_size, chunk_indices=None, scaled=False):
    """The gradients of the chunk-end states [B, NT, H, K, V] and of h0: as `ScaledStates` from our
    `chunk_state_grads_bwd` where the states are scaled, else float32 from fla's `chunk_bwd_dh`. Both cast do to
    q's dtype themselves, so x (float32) with half-precision do needs no copy; k and v give only the shapes."""
    if scaled:
        return chunk_state_grads_bwd(q, do, g, dht, h0 is not None, cu_seqlens, chunk_indices, chunk_size)
    from fla.ops.common.chunk_h import chunk_bwd_dh
    return chunk_bwd_dh(q=q, k=k, v=v, do=do, h0=h0, dht=dht, scale=1.0, g=g, cu_seqlens=cu_seqlens,
                        chunk_size=chunk_size, states_in_fp32=True)


def _cuda_bwd(q, k, v, gc, beta, lamb, h0_kk, h0_kv, x, do, dht_kk, dht_kv, cg_steps, cg_tol, cg_init, fp32_backward,
              cu_seqlens, chunk_indices, chunk_size, cg_precond):
    # gc: the forward's chunk-local cumulative log2 gate
    from fla.ops.utils import chunk_local_cumsum

    through_h = cg_steps > 0 or dht_kk is not None
    varlen = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size)
    # the forward's chunk states again (from float32 beta * v and beta * k, as the forward formed them), stored as the
    # forward stored them, except for fla's primitives (fp32_backward=False), which read float32 states only
    states = dict(varlen, scaled=fp32_backward and scaled_states(k))
    if states['scaled'] and cg_steps > 0 and v.shape == k.shape:
        return _fused_bwd(q, k, v, beta, lamb, h0_kk, h0_kv, x, do, dht_kk, dht_kv, gc, cg_steps, cg_tol, cg_init,
                          cg_precond, varlen)
    h_kk = None
    if through_h and states['scaled'] and v.shape == k.shape:
        # both scans from one launch; H's float16 states wait through S's pass, which is not the backward's peak
        (h_kk, _), (h_kv, _) = chunk_state_pair_fwd(k, v, beta, gc, h0_kk, h0_kv, **states)
    else:
        h_kv, _ = chunk_states_fwd(k, v, beta, gc, h0_kv, **states)
    if fp32_backward:
        dh_kv, dh0_kv = _state_grads(x, k, v, do, h0_kv, dht_kv, gc, cu_seqlens, chunk_size, chunk_indices,
                                     states['scaled'])
        dx, dv, dk, dg, dbeta = chunk_gla_bwd(x, k, v, beta, do, h_kv, dh_kv, gc, **varlen)
        del h_kv, dh_kv  # here and below: each temporary goes as soon as it is used, for the peak memory
    else:  # fla's GLA backward passes on operands in the inputs' dtype
        kb, vb, xq = bwd_prep(k, v, beta, x, with_kb=through_h)
        dx, dk_s, dvb, dg, dh0_kv = _gla_bwd(xq, k, vb, h_kv, h0_kv, do, dht_kv, gc, **varlen)
        del vb, h_kv
    if through_h and h_kk is None:
        h_kk = chunk_states_fwd(k, k, beta, gc, h0_kk, **states)[0]
    # H's side (the solve's states serve it too) has "output gradient" -u; without CG steps it runs only for a
    # final-state gradient, with u = 0. fp32_backward's pass takes u itself: the pass of +u and -dht, negated
    dy_dtype = None if fp32_backward else k.dtype
    if cg_steps == 0:
        dq, dlamb = dx, torch.zeros_like(lamb, dtype=torch.float32)
        dy = torch.zeros_like(x, dtype=dy_dtype or x.dtype) if through_h else None
    else:
        u, _, _ = chunk_cg_solve(dx, k, beta, gc, h_kk, lamb, cg_steps, cg_tol, adjoint_init(cg_init, cg_tol), False,
                                 cu_seqlens, chunk_indices, chunk_size, cg_precond=cg_precond)
        del dx
        if fp32_backward:
            dy = u
        else:
            dq, dy, dlamb = bwd_solve(u, x, q.dtype, dy_dtype)
        del u
    dh0_kk = None
    if fp32_backward:
        # the last pass over dk stores k's gradient in k's dtype, no cast after it
        if through_h:
            dh_u, dh0_u = _state_grads(x, k, k, dy, h0_kk, None if dht_kk is None else -dht_kk, gc, cu_seqlens,
                                       chunk_size, chunk_indices, states['scaled'])
            _, dk, _, _, _ = chunk_gla_bwd(x, k, k, beta, dy, h_kk, dh_u, gc, acc=(dk, dk, dg, dbeta), negate=True,
                                           with_dq=False, dv_out=torch.empty_like(k) if k.dtype != dk.dtype else None,
                                           **varlen)
            dh0_kk = None if dh0_u is None else -dh0_u
            del dh_u
        if cg_steps > 0:  # dq after H's pass, not held through it (the backward's peak of memory)
            dq, _, dlamb = bwd_solve(dy, x, q.dtype, None)
        B, T, H = beta.shape
        # sums over key and value blocks; one block (D <= 64) needs no reduction
        dg, dbeta = ((t[0] if len(t) == 1 else t.sum(0)).view(B, T, H) for t in (dg, dbeta))
    else:
        dk_h = dkb = None
        if through_h:
            _, dk_h, dkb, dg_h, dh0_kk = _gla_bwd(xq, k, kb, h_kk, h0_kk, dy, dht_kk, gc, **varlen)
            dg = dg + dg_h
        del kb, xq
        dk, dv, dbeta = bwd_combine(k, v, beta, dk_s, dk_h, dkb, dvb)
    del h_kk, dy
    dg = chunk_local_cumsum(dg, chunk_size=chunk_size, reverse=True, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
    return dq, dk, dv, dg, dbeta, dlamb, dh0_kk, dh0_kv


def _fused_bwd(q, k, v, beta, lamb, h0_kk, h0_kv, x, do, dht_kk, dht_kv, gc, cg_steps, cg_tol, cg_init, cg_precond,
               varlen):
    """`_cuda_bwd` at K = V <= 64 with float16 states and CG steps: the adjoint solve from do (its kernel forms
    dx = S_t do_t), both passes' state gradients from one launch (`chunk_state_grads_pair_bwd`), then both passes'
    gradients together (`mesa_backward`)."""
    (h_kk, _), (h_kv, _) = chunk_state_pair_fwd(k, v, beta, gc, h0_kk, h0_kv, scaled=True, **varlen)
    u, _, _ = chunk_cg_solve(do, k, beta, gc, h_kk, lamb, cg_steps, cg_tol, adjoint_init(cg_init, cg_tol), False, v=v,
                             h_kv=h_kv, cg_precond=cg_precond, adjoint=True, **varlen)
    # H's pass has output gradient -u: the scan of +u takes -dht_kk, and its gradients are subtracted
    (dh_kv, dh0_kv), (dh_u, dh0_u) = chunk_state_grads_pair_bwd(x, do, u, gc, dht_kv, None if dht_kk is None else
                                                                -dht_kk, h0_kv is not None, **varlen)
    dk_key, dg = mesa_bwd_dk(x, k, v, beta, do, u, lamb, h_kk, h_kv, dh_u, dh_kv, gc, **varlen)
    del h_kk, h_kv  # the states go before the last kernel's outputs come (the backward's peak of memory)
    dq, dk, dv, dbeta, dlamb = mesa_bwd_dw(q, x, k, v, beta, do, u, dh_u, dh_kv, gc, dk_key, **varlen)
    return dq, dk, dv, dg, dbeta, dlamb, None if dh0_u is None else -dh0_u, dh0_kv


class ChunkMesaFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, beta, lamb, h0_kk, h0_kv, cg_steps, cg_tol, cg_init, output_final_state,
                return_iters, cu_seqlens, chunk_size, fp32_backward, cg_precond, save_x):
        ctx.g_dtype = g.dtype
        if q.is_cuda:
            from fla.ops.utils import prepare_chunk_indices
            q, k, v, g, beta, lamb = (t.contiguous() for t in (q, k, v, g, beta, lamb))
            chunk_indices = None if cu_seqlens is None else prepare_chunk_indices(cu_seqlens, chunk_size)
            with torch.cuda.device(q.device):
                o, ht_kk, ht_kv, x, iters, gc = _cuda_fwd(q, k, v, g, beta, lamb, h0_kk, h0_kv, cg_steps, cg_tol,
                                                          cg_init, return_iters, output_final_state, cu_seqlens,
                                                          chunk_indices, chunk_size, cg_precond, save_x)
            g = gc  # the backward takes the cumulative gate (as many bytes as a float32 g), not its own cumsum
        else:
            chunk_indices = None
            o, ht_kk, ht_kv, x, iters = _torch_fwd(q, k, v, g, beta, lamb, h0_kk, h0_kv, cg_steps, cg_tol, cg_init,
                                                   return_iters, chunk_size, cg_precond)
        ctx.save_for_backward(q, k, v, g, beta, lamb, h0_kk, h0_kv, x, cu_seqlens, chunk_indices)
        ctx.opts = (cg_steps, cg_tol, cg_init, chunk_size, fp32_backward, cg_precond)
        ctx.mark_non_differentiable(*([iters] if iters is not None else []))
        if not output_final_state:
            ht_kk = ht_kv = None
        return o.to(v.dtype), ht_kk, ht_kv, iters

    @staticmethod
    def backward(ctx, do, dht_kk, dht_kv, _):
        q, k, v, g, beta, lamb, h0_kk, h0_kv, x, cu_seqlens, chunk_indices = ctx.saved_tensors
        cg_steps, cg_tol, cg_init, chunk_size, fp32_backward, cg_precond = ctx.opts
        if q.is_cuda:  # g holds the forward's gc
            with torch.cuda.device(q.device):
                grads = _cuda_bwd(q, k, v, g, beta, lamb, h0_kk, h0_kv, x, do.contiguous(), dht_kk, dht_kv, cg_steps,
                                  cg_tol, cg_init, fp32_backward, cu_seqlens, chunk_indices, chunk_size, cg_precond)
        else:
            grads = _torch_bwd(q, k, v, g, beta, lamb, h0_kk, h0_kv, x, do, dht_kk, dht_kv, cg_steps, cg_tol,
                               cg_init, chunk_size, cg_precond)
        dq, dk, dv, dg, dbeta, dlamb, dh0_kk, dh0_kv = grads
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(ctx.g_dtype), dbeta.to(beta.dtype),
                dlamb.to(lamb.dtype), None if dh0_kk is None else dh0_kk.to(h0_kk.dtype),
                None if dh0_kv is None else dh0_kv.to(h0_kv.dtype), *(None,) * 10)


def _split_varlen(t, bounds):
    """`[1, T, ...]` packed sequences -> `[N, max_len, ...]`, zero-padded at the end."""
    return pad_sequence([t[0, s:e] for s, e in zip(bounds, bounds[1:])], batch_first=True)


def _join_varlen(t, bounds):
    return torch.cat([t[n, :e - s] for n, (s, e) in enumerate(zip(bounds, bounds[1:]))])[None]


@torch.compiler.disable
def chunk_mesa(
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
    chunk_size: int = 64,
    check_values: bool = True,
    fp32_backward: bool = True,
    cg_precond: str = 'none',
):
    r"""The Mesa layer's sequence op: o_t = S_t^T (H_t + diag(lamb))^{-1} q_t, chunked.

    H_t = exp(g_t) H_{t-1} + beta_t k_t k_t^T and S_t = exp(g_t) S_{t-1} + beta_t k_t v_t^T (S_t = G_t^T of
    the paper). The solve is `cg_steps` iterations of conjugate gradient per token (all tokens at once);
    gradients are those of the exact solve (implicit differentiation), so they are exact once CG converged.

    Args:
        q (torch.Tensor): queries `[B, T, H, K]`; float32, bfloat16, float16 (or float64 off CUDA).
        k (torch.Tensor): keys `[B, T, H, K]`, L2-normalised (or pass `use_qk_l2norm_in_kernel=True`).
        v (torch.Tensor): values `[B, T, H, V]`. q, k and v share one dtype.
        g (torch.Tensor): log forget gate `[B, T, H]`, every entry <= 0; float32 recommended.
        beta (torch.Tensor): input gate `[B, T, H]`, in (0, 1).
        lamb (torch.Tensor): the regulariser diag(lamb) `[H, K]`, every entry > 0.
        cg_steps (int): CG iterations, or the cap on them when `cg_tol` is set. 0 gives gated linear
            attention (x = q). Default: 30, as in the paper.
        cg_tol (float | None): stop a chunk of tokens once each has ||r_k|| <= cg_tol * ||r_0|| (the paper's
            rule; r_0 is the residual of the start). `None` runs `cg_steps` iterations, or fewer for tokens whose
            residual reaches the floor of the products' precision: `2^-16 * ||r_0||` for the CUDA kernel's tf32 or
            float16 products (float32's eps under `TRITON_F32_DEFAULT=ieee`), `eps * ||r_0||` with the compute
            dtype's eps on the PyTorch path; tolerances below the floor act as the floor. Default: None.
        cg_init (str): `'jacobi'` (x_0 = q / diag(H_t + diag(lamb)), the paper's start) or `'zero'`. The backward's
            solve starts from it under `cg_tol`, from zero without (`adjoint_init`).
        cg_precond (str): `'jacobi'` runs CG preconditioned with diag(H_t + diag(lamb)), in the forward's solve and
            the backward's; `'none'` (default, the paper's): plain CG. On CPU inputs with lamb spread over 0.25-5
            across channels it took 11 iterations a token instead of 31 to the float32 floor; with one lamb per head
            it gains nothing, and in the demo's trained model (lamb within 1.08x) it took 7-20% more iterations.
            On an H200 (D=128, lamb spread as above) it took 0.36x fla `chunk_mesa_net`'s time forward, where plain
            CG, capped at 30 iterations, took 0.49x; with lamb = 1 its CG kernel takes 14% (D=128) to 22% (D=64)
            longer than plain CG's (benchmarks/RESULTS.md).
        initial_state (tuple | None): `(h_kk [N, H, K, K], h_kv [N, H, K, V])`, N = B, or the number of
            sequences with `cu_seqlens`.
        output_final_state (bool): also return the final state, in the same format.
        cu_seqlens (torch.LongTensor | None): `[N + 1]` offsets of packed sequences; needs B = 1.
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k inside the op (fla's `l2norm` on CUDA).
        return_cg_iters (bool): also return the CG iterations each token ran before meeting `cg_tol`
            (int32 `[B, T, H]`; without a tolerance, the iterations to the precision floor, at most `cg_steps`).
        chunk_size (int): tokens per chunk, 16, 32 or 64 on CUDA. Default: 64.
        check_values (bool): raise if some lamb <= 0 or g > 0. Each of the two checks waits for the device on
            CUDA (and cannot run under CUDA-graph capture); pass False where they hold by construction, as
            `MesaAttention` does. Shapes and dtypes are always checked. Default: True.
        fp32_backward (bool): on CUDA with half-precision inputs, run the backward's two GLA passes with float32
            (tf32) products, in our `gla_backward` or (K = V <= 64) `mesa_backward` kernels, instead of fla's Triton
            primitives on operands in the inputs' dtype. With bf16 inputs on an H100 it takes every gradient's error
            against the float64 exact solve below fla's `chunk_mesa_net`'s at D=128 and D=64 (dk 2.5e-3, fla
            2.7e-3, 4.7e-3 without it; the bf16 floor is 1.7e-3), in the forward+backward time of `False` or less
            (0.99x at D=128 on an H100, 1.04x on an H200; 0.91x at D=64 on an H100) and with 0.19 / 0.09 GiB less
            peak memory, at B=8, T=2048, H=16 (benchmarks/RESULTS.md). With float32 inputs both settings multiply
            in float32 (tf32); off CUDA it has no effect (the PyTorch path computes in float32 or float64).
            Default: True.

    Returns:
        o (torch.Tensor): `[B, T, H, V]` in v's dtype.
        final_state (tuple | None): `(h_kk, h_kv)`, float32 (float64 for float64 inputs), if `output_final_state`.
        cg_iters (torch.Tensor): only if `return_cg_iters`.

    Precision: the chunk states of H and G, every CG vector (x, r, p, residual norms) and the output
    product are float32 whatever the input dtype (float64 for float64 inputs off CUDA); final states are
    float32. On CUDA the products run on tensor cores at unit roundoff 2^-11: tf32, as in fla's chunk
    primitives, except in the CG kernel with half-precision inputs, whose operands are float16 scaled by powers of
    two (tf32's significand, rounded to nearest instead of truncated, at twice the rate); the backward's GLA passes
    multiply in float32 (half-precision k, v and do read as they are), or with `fp32_backward=False` take x, -u, k,
    beta * k, beta * v and do in the input dtype.
    """
    B, T, H, K, V, N = check_inputs(q, k, v, g, beta, lamb, initial_state, cu_seqlens, cg_steps, cg_tol, cg_init,
                                    check_values, cg_precond)
    if not isinstance(fp32_backward, bool):
        raise ValueError(f"`fp32_backward`: expected a bool, got {fp32_backward!r}")
    if chunk_size not in (16, 32, 64) and (q.is_cuda or chunk_size < 1 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"`chunk_size`: expected 16, 32 or 64 (a power of two off CUDA), got {chunk_size}")
    if q.is_cuda:
        narrow_fla_autotune(q.device)
    if use_qk_l2norm_in_kernel:
        if q.is_cuda:
            from fla.modules.l2norm import l2norm as fla_l2norm
            q, k = fla_l2norm(q), fla_l2norm(k)
        else:
            q, k = l2norm(q), l2norm(k)
    h0_kk, h0_kv = (None, None) if initial_state is None else initial_state
    # x is kept for the backward only where one can run: without it the CUDA forward does not write x at all
    save_x = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                             for t in (q, k, v, g, beta, lamb, h0_kk, h0_kv))
    if cu_seqlens is not None and not q.is_cuda:
        bounds = cu_seqlens.tolist()
        split = [_split_varlen(t, bounds) for t in (q, k, v, g, beta)]
        o, ht_kk, ht_kv, iters = ChunkMesaFunction.apply(*split, lamb, h0_kk, h0_kv, cg_steps, cg_tol, cg_init,
                                                          output_final_state, return_cg_iters, None, chunk_size,
                                                          fp32_backward, cg_precond, save_x)
        o = _join_varlen(o, bounds)
        iters = None if iters is None else _join_varlen(iters, bounds)
    else:
        o, ht_kk, ht_kv, iters = ChunkMesaFunction.apply(q, k, v, g, beta, lamb, h0_kk, h0_kv, cg_steps, cg_tol,
                                                          cg_init, output_final_state, return_cg_iters, cu_seqlens,
                                                          chunk_size, fp32_backward, cg_precond, save_x)
    final_state = (ht_kk, ht_kv) if output_final_state else None
    if return_cg_iters:
        return o, final_state, iters
    return o, final_state
