"""PyTorch counterparts of fla's chunk primitives, for tensors off CUDA (fla's Triton kernels need a GPU).

The same chunked algorithm as the CUDA path: chunk-start states, then one "GLA output" pass per product.
Differences from fla's kernels: the cumulative gate is in natural log (fla's is base 2), and every
tensor's length T is a multiple of the chunk size (`pad_to_chunks` pads with inert zeros: g = 0 decays
nothing, k = 0 adds nothing).
"""

import torch
import torch.nn.functional as F


def pad_to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Zero-pads dim 1 (time) of `x` up to a multiple of `chunk_size`."""
    pad = -x.shape[1] % chunk_size
    if pad == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))


def chunk_cumsum(g: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Chunk-local cumulative sum of `g` `[B, T, H]` (T a multiple of `chunk_size`)."""
    B, T, H = g.shape
    return g.view(B, T // chunk_size, chunk_size, H).cumsum(2).view(B, T, H)


def decay_matrix(gc: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """exp(gc_i - gc_j) for j <= i inside each chunk, else 0: `[B, NT, H, C, C]`."""
    B, T, H = gc.shape
    gcc = gc.view(B, T // chunk_size, chunk_size, H).transpose(2, 3)
    diff = gcc[..., :, None] - gcc[..., None, :]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=gc.device).tril()
    return torch.where(causal, diff, float('-inf')).exp()


def chunk_states(k, v, gc, h0, chunk_size):
    """Chunk-start states `[B, NT, H, K, V]` of S_t = exp(g_t) S_{t-1} + k_t v_t^T, and the final state."""
    B, T, H, K = k.shape
    V, NT = v.shape[-1], T // chunk_size
    gcc = gc.view(B, NT, chunk_size, H)
    g_last = gcc[:, :, -1]
    k_decayed = k.view(B, NT, chunk_size, H, K) * (g_last[:, :, None] - gcc).exp()[..., None]
    contrib = torch.einsum('bnchk,bnchv->bnhkv', k_decayed, v.view(B, NT, chunk_size, H, V))
    h = k.new_zeros(B, H, K, V) if h0 is None else h0.to(k.dtype)
    states = []
    for n in range(NT):
        states.append(h)
        h = g_last[:, n, :, None, None].exp() * h + contrib[:, n]
    return (torch.stack(states, dim=1) if states else k.new_zeros(B, 0, H, K, V)), h


def chunk_output(q, k, v, h, gc, chunk_size, decay=None):
    """o_t = exp(gc_t) q_t S_c + sum_{s <= t in chunk} exp(gc_t - gc_s) (q_t . k_s) v_s, `[B, T, H, V]`.

    `decay` is `decay_matrix(gc, chunk_size)`, when the caller has it already.
    """
    if decay is None:
        decay = decay_matrix(gc, chunk_size)
    B, T, H, K = q.shape
    V, NT = v.shape[-1], T // chunk_size
    qc = q.view(B, NT, chunk_size, H, K)
    gcc = gc.view(B, NT, chunk_size, H)
    inter = torch.einsum('bnchk,bnhkv->bnchv', qc * gcc.exp()[..., None], h)
    scores = torch.einsum('bnihk,bnjhk->bnhij', qc, k.view(B, NT, chunk_size, H, K)) * decay
    intra = torch.einsum('bnhij,bnjhv->bnihv', scores, v.view(B, NT, chunk_size, H, V))
    return (inter + intra).reshape(B, T, H, V)


def chunk_diag(k, beta, gc, h_kk, chunk_size, decay):
    """diag(H_t) for every t, `[B, T, H, K]`: a decayed cumulative sum of beta * k * k inside each chunk.

    `decay` is `decay_matrix(gc, chunk_size)`.
    """
    B, T, H, K = k.shape
    NT = T // chunk_size
    gcc = gc.view(B, NT, chunk_size, H)
    inter = gcc.exp()[..., None] * torch.diagonal(h_kk, dim1=-2, dim2=-1)[:, :, None]
    kk = (beta[..., None] * k * k).view(B, NT, chunk_size, H, K)
    intra = torch.einsum('bnhij,bnjhk->bnihk', decay, kk)
    return (inter + intra).reshape(B, T, H, K)
