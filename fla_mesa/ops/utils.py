"""Argument checks, the CG start and the paper's forget-gate cap, shared by every Mesa path."""

import math

import torch

CG_INITS = ('jacobi', 'zero')
CG_PRECONDS = ('none', 'jacobi')
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# the widest head the Triton kernels are built for: their tiles hold a whole key/value row
MAX_HEAD_DIM = 256


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim: fla's `l2norm` formula, in PyTorch."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def step_states(h_kk, h_kv, k_t, v_t, g_t, beta_t):
    """One step of H_t = exp(g_t) H_{t-1} + beta_t k_t k_t^T and S_t = exp(g_t) S_{t-1} + beta_t k_t v_t^T."""
    decay = g_t.exp()[..., None, None]
    bk = beta_t[..., None] * k_t
    h_kk = decay * h_kk + bk[..., :, None] * k_t[..., None, :]
    h_kv = decay * h_kv + bk[..., :, None] * v_t[..., None, :]
    return h_kk, h_kv


def cg_init_guess(b: torch.Tensor, diag: torch.Tensor, cg_init: str) -> torch.Tensor:
    """The CG starting point for `(H + diag(lamb)) x = b`: `b / diag(H + diag(lamb))` or zeros."""
    if cg_init == 'jacobi':
        return b / diag
    return torch.zeros_like(b)


def cg_threshold(cg_tol: float | None, floor: float) -> float:
    """The square of the relative residual at which a token's CG stops: `max(cg_tol, floor) ** 2`.

    Without a tolerance a token still stops at `floor`, set by the precision of the solver's products: the
    compute dtype's machine epsilon, below which the recursively updated residual underflows and CG diverges,
    or `cg.TF32_FLOOR` for the Triton kernel's tf32 or float16 products, below which more iterations no longer
    improve x measurably.
    """
    return max(cg_tol or 0., floor) ** 2


def forget_gate_cap(g: torch.Tensor, beta: torch.Tensor, cap: float | None) -> torch.Tensor:
    r"""The paper's guard against runs of one repeated token (MesaNet, appendix G.5).

    gamma_t <- gamma_t * (1 - (1 - cap) * beta_t ** 2), done in log space on `g = log(gamma)`.
    `cap=None` returns `g` unchanged.
    """
    if cap is None:
        return g
    return g + torch.log1p(-(1.0 - cap) * beta.float() ** 2).to(g.dtype)


def _fail(name, expected, got):
    raise ValueError(f"`{name}`: expected {expected}, got {got}")


def check_inputs(q, k, v, g, beta, lamb, initial_state, cu_seqlens, cg_steps, cg_tol, cg_init, check_values=True,
                 cg_precond='none'):
    """Raises `ValueError` naming the first argument that does not fit; returns (B, T, H, K, V, N).

    `check_values=False` skips the two checks that read tensor values (lamb > 0, g <= 0): on CUDA each one waits
    for the device."""
    for name, x in (('q', q), ('k', k), ('v', v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            _fail(name, "a 4-d tensor [B, T, H, D]", getattr(x, 'shape', type(x)))
        if x.dtype not in SUPPORTED_DTYPES:
            _fail(name, f"one of {SUPPORTED_DTYPES}", x.dtype)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape:
        _fail('k', f"the shape of q {tuple(q.shape)}", tuple(k.shape))
    if v.shape[:3] != q.shape[:3]:
        _fail('v', f"[B, T, H, V] = [{B}, {T}, {H}, V] (batch, length and heads of q)", tuple(v.shape))
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail('k/v', f"the dtype of q ({q.dtype})", (k.dtype, v.dtype))
    for name, x in (('g', g), ('beta', beta)):
        if not isinstance(x, torch.Tensor) or x.shape != (B, T, H):
            _fail(name, f"shape [B, T, H] = [{B}, {T}, {H}]", tuple(getattr(x, 'shape', ())) or type(x))
        if not x.is_floating_point():
            _fail(name, "a floating-point tensor", x.dtype)
    if not isinstance(lamb, torch.Tensor) or lamb.shape != (H, K):
        _fail('lamb', f"shape [H, K] = [{H}, {K}]", tuple(getattr(lamb, 'shape', ())) or type(lamb))
    if not lamb.is_floating_point():
        _fail('lamb', "a floating-point tensor", lamb.dtype)
    device = q.device
    for name, x in (('k', k), ('v', v), ('g', g), ('beta', beta), ('lamb', lamb)):
        if x.device != device:
            _fail(name, f"a tensor on {device} like q", x.device)
    if T > 0 and check_values:
        if not bool((lamb > 0).all()):
            _fail('lamb', "every entry > 0 (H + diag(lamb) must be positive definite)",
                  f"min {lamb.min().item():.3g}")
        if bool((g > 0).any()):
            _fail('g', "a log forget gate, every entry <= 0", f"max {g.max().item():.3g}")
    if q.is_cuda:
        if q.dtype == torch.float64:
            _fail('q', "float32, bfloat16 or float16 on CUDA (float64 runs on the CPU path)", q.dtype)
        if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
            _fail('q/v', f"head dims K and V <= {MAX_HEAD_DIM} on CUDA", (K, V))
    N = B
    if cu_seqlens is not None:
        if B != 1:
            _fail('cu_seqlens', "batch size 1 with cu_seqlens (sequences packed along T)", f"batch {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            _fail('cu_seqlens', "a 1-d int32/int64 tensor of sequence boundaries", (cu_seqlens.dtype, tuple(cu_seqlens.shape)))
        bounds = cu_seqlens.tolist()
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds)):
            _fail('cu_seqlens', f"non-decreasing offsets from 0 to T={T}", bounds)
        N = len(bounds) - 1
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            _fail('initial_state', "a pair (h_kk [N, H, K, K], h_kv [N, H, K, V])", type(initial_state))
        h_kk, h_kv = initial_state
        if tuple(h_kk.shape) != (N, H, K, K):
            _fail('initial_state[0]', f"h_kk of shape [N, H, K, K] = [{N}, {H}, {K}, {K}]", tuple(h_kk.shape))
        if tuple(h_kv.shape) != (N, H, K, V):
            _fail('initial_state[1]', f"h_kv of shape [N, H, K, V] = [{N}, {H}, {K}, {V}]", tuple(h_kv.shape))
    if not isinstance(cg_steps, int) or cg_steps < 0:
        _fail('cg_steps', "an int >= 0", cg_steps)
    if cg_tol is not None and not (isinstance(cg_tol, (int, float)) and 0 < cg_tol < 1 and math.isfinite(cg_tol)):
        _fail('cg_tol', "None or a float in (0, 1), the relative residual ||r_k|| / ||r_0|| to stop at", cg_tol)
    if cg_init not in CG_INITS:
        _fail('cg_init', f"one of {CG_INITS}", repr(cg_init))
    if cg_precond not in CG_PRECONDS:
        _fail('cg_precond', f"one of {CG_PRECONDS}", repr(cg_precond))
    return B, T, H, K, V, N
