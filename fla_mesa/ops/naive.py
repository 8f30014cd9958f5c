"""Plain PyTorch references for the Mesa op: written for clarity, not speed.

Both references step the recurrence token by token
    H_t = exp(g_t) H_{t-1} + beta_t k_t k_t^T          [K, K]
    S_t = exp(g_t) S_{t-1} + beta_t k_t v_t^T          [K, V]   (S_t = G_t^T)
    o_t = S_t^T x_t,   (H_t + diag(lamb)) x_t = q_t
and are differentiable with autograd. They compute in the promoted dtype of their inputs, at least
float32, so float64 inputs give a float64 reference.
"""

import torch
from fla_mesa.ops.utils import cg_init_guess, l2norm, step_states


def _prepare(q, k, v, g, beta, lamb, initial_state, use_qk_l2norm):
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    q, k, v, g, beta, lamb = (x.to(dtype) for x in (q, k, v, g, beta, lamb))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if initial_state is None:
        h_kk = q.new_zeros(B, H, K, K)
        h_kv = q.new_zeros(B, H, K, V)
    else:
        h_kk, h_kv = (s.to(dtype) for s in initial_state)
    return q, k, v, g, beta, lamb, h_kk, h_kv


def naive_recurrent_mesa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    lamb: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
):
    r"""Mesa with an exact solve (`torch.linalg.solve`) at every step.

    Args:
        q, k: `[B, T, H, K]`. v: `[B, T, H, V]`. g (log forget gate, <= 0), beta: `[B, T, H]`.
        lamb: `[H, K]`, > 0. initial_state: `(h_kk [B, H, K, K], h_kv [B, H, K, V])` or `None`.
    Returns:
        o `[B, T, H, V]` in the compute dtype, and the final state `(h_kk, h_kv)` (or `None`).
    """
    q, k, v, g, beta, lamb, h_kk, h_kv = _prepare(q, k, v, g, beta, lamb, initial_state, use_qk_l2norm)
    eye_lamb = torch.diag_embed(lamb)
    outs = []
    for t in range(q.shape[1]):
        h_kk, h_kv = step_states(h_kk, h_kv, k[:, t], v[:, t], g[:, t], beta[:, t])
        # fla reads a [K, K] state S as y = S^T x; H_t is symmetric, so this is H_t itself, and it gives a
        # caller's (symmetric) initial state the same gradient as the chunked op
        x = torch.linalg.solve(h_kk.transpose(-1, -2) + eye_lamb, q[:, t])
        outs.append(torch.einsum('bhk,bhkv->bhv', x, h_kv))
    o = torch.stack(outs, dim=1)
    return o, ((h_kk, h_kv) if output_final_state else None)


def naive_cg_mesa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    lamb: torch.Tensor,
    cg_steps: int = 30,
    cg_init: str = 'jacobi',
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    cg_precond: str = 'none',
):
    r"""Mesa where every step's system is solved by exactly `cg_steps` iterations of conjugate gradient.

    Same arguments and returns as `naive_recurrent_mesa`, plus `cg_steps`, `cg_init` (`'jacobi'`:
    x0 = q / diag(H_t + diag(lamb)), the paper's start; `'zero'`: x0 = 0) and `cg_precond` (`'jacobi'`: CG
    preconditioned with M = diag(H_t + diag(lamb)); `'none'`: plain CG). `cg_steps=0` with
    `cg_init='zero'` would give o = 0; gated linear attention is `cg_steps=0` with x = q, which is what
    `chunk_mesa` does for `cg_steps=0` whatever the start.
    """
    q, k, v, g, beta, lamb, h_kk, h_kv = _prepare(q, k, v, g, beta, lamb, initial_state, use_qk_l2norm)
    outs = []
    for t in range(q.shape[1]):
        h_kk, h_kv = step_states(h_kk, h_kv, k[:, t], v[:, t], g[:, t], beta[:, t])
        b = q[:, t]

        def matvec(p):
            return torch.einsum('bhji,bhj->bhi', h_kk, p) + lamb * p

        if cg_steps == 0:
            x = b
        else:
            diag = torch.diagonal(h_kk, dim1=-2, dim2=-1) + lamb
            x = cg_init_guess(b, diag, cg_init)
            r = b - matvec(x)
            z = r / diag if cg_precond == 'jacobi' else r
            p = z
            rz = (r * z).sum(-1, keepdim=True)
            for _ in range(cg_steps):
                ap = matvec(p)
                pap = (p * ap).sum(-1, keepdim=True)
                alpha = torch.where(pap > 0, rz / torch.where(pap > 0, pap, 1), 0)
                x = x + alpha * p
                r = r - alpha * ap
                z = r / diag if cg_precond == 'jacobi' else r
                rz_new = (r * z).sum(-1, keepdim=True)
                p = z + torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1), 0) * p
                rz = rz_new
        outs.append(torch.einsum('bhk,bhkv->bhv', x, h_kv))
    o = torch.stack(outs, dim=1)
    return o, ((h_kk, h_kv) if output_final_state else None)
