"""Random Mesa inputs for the op tests: gate and lambda regimes the properties must hold across."""

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from fla_mesa.ops import chunk_mesa

# log forget gate g: near 0 (gamma ~ 1, long memory), moderate, or very negative (gamma ~ 0)
GATE_RANGES = {'keep': (-1e-3, 0.0), 'mid': (-1.0, -0.01), 'forget': (-20.0, -5.0)}
# input gate beta near 0, anywhere, or near 1
BETA_RANGES = {'low': (0.0, 0.05), 'any': (0.0, 1.0), 'high': (0.95, 1.0)}


def make_inputs(B, T, H, K, V, gate='mid', beta_range='any', lamb_range=(0.3, 3.0), initial_state=False,
                dtype=torch.float64, device='cpu', seed=0):
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)

    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = uniform((B, T, H), *GATE_RANGES[gate])
    beta = uniform((B, T, H), *BETA_RANGES[beta_range])
    lo, hi = lamb_range
    lamb = torch.exp(uniform((H, K), torch.log(torch.tensor(lo)).item(), torch.log(torch.tensor(hi)).item()))
    state = None
    if initial_state:
        a = torch.randn(B, H, K, K, generator=gen, dtype=torch.float64) / K ** 0.5
        state = (a @ a.transpose(-1, -2), torch.randn(B, H, K, V, generator=gen, dtype=torch.float64))
    cast = dict(device=device)
    q, k, v = (t.to(dtype=dtype, **cast) for t in (q, k, v))
    g, beta, lamb = (t.to(dtype=torch.float64 if dtype == torch.float64 else torch.float32, **cast) for t in (g, beta, lamb))
    if state is not None:
        state = tuple(s.to(dtype=torch.float64 if dtype == torch.float64 else torch.float32, **cast) for s in state)
    return q, k, v, g, beta, lamb, state


def grads_on(fn, inputs, do, dtype=None):
    """[o, dq, dk, dv, dg, dbeta, dlamb] of `o = fn(*inputs)[0]` with output gradient `do`, on copies of the inputs
    (cast to `dtype` if given), and the rest of what `fn` returned. Shared by the GPU tests and the op
    benchmarks."""
    leaves = [(t.to(dtype) if dtype else t.clone()).requires_grad_() for t in inputs]
    o, *rest = fn(*leaves)
    return [o, *torch.autograd.grad(o, leaves, do.to(o.dtype))], rest


def rel(a, b):
    """Relative error of a against the reference b, in the Frobenius norm."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def state_grads_reference(q, do, gc, dht, chunk_size, bounds=None):
    """float64 gradients of the chunk-end states of a GLA pass with query q `[B, T, H, K]` and output gradient do
    (what fla's `chunk_bwd_dh` and our reverse scan give): `[B, NT, H, K, V]`, chunk c's back through the later chunks
    from the final states' gradient dht `[N, H, K, V]` (or zeros), and the initial states' `[N, H, K, V]`. gc: the
    chunk-local cumulative log2 gate; bounds: the packed sequences' offsets (B = 1), or None."""
    B, T, H, K = q.shape
    seqs = [(0, s, e) for s, e in zip(bounds, bounds[1:])] if bounds is not None else [(b, 0, T) for b in range(B)]
    dh, dh0 = [[] for _ in range(B)], []
    for n, (b, s, e) in enumerate(seqs):
        run = torch.zeros(H, K, do.shape[-1], dtype=torch.float64) if dht is None else dht[n].double()
        ends = []
        for t0 in reversed(range(s, e, chunk_size)):
            t = slice(t0, min(t0 + chunk_size, e))
            ends.append(run)
            G = torch.exp2(gc[b, t].double())
            run = G[-1][:, None, None] * run + torch.einsum('th,thk,thv->hkv', G, q[b, t].double(), do[b, t].double())
        dh[b] += ends[::-1]
        dh0.append(run)
    return torch.stack([torch.stack(d, 0) for d in dh], 0), torch.stack(dh0, 0)


@st.composite
def shapes(draw, max_T=70):
    return dict(
        B=draw(st.integers(1, 2)),
        T=draw(st.integers(1, max_T)),
        H=draw(st.integers(1, 2)),
        K=draw(st.sampled_from([4, 8, 16])),
        V=draw(st.sampled_from([3, 8])),
    )


def exact_solve(q, k, v, g, beta, lamb, h0=None, g0=None):
    """Float64, token by token: x_t = (H_t + diag(lamb))^{-1} q_t `[B, T, H, K]`, o_t = G_t x_t `[B, T, H, V]`, and
    the size of that product, ||G_t[:, j]|| ||x_t|| `[B, T, H, V]`: what the dtype's rounding bounds o's error by,
    even where o_t itself is small by cancellation. H starts at `h0` `[B, H, K, K]` (or zero), G^T at `g0`
    `[B, H, K, V]` (or zero)."""
    q, k, v, g, beta, lamb = (t.double() for t in (q, k, v, g, beta, lamb))
    B, T, H, K = q.shape
    V = v.shape[-1]
    Hs = torch.zeros(B, H, K, K, dtype=torch.float64) if h0 is None else h0.double()
    Gs = torch.zeros(B, H, K, V, dtype=torch.float64) if g0 is None else g0.double()
    x, o, size = torch.empty_like(q), q.new_empty(B, T, H, V), q.new_empty(B, T, H, V)
    for t in range(T):
        decay, bt, kt = g[:, t].exp()[..., None, None], beta[:, t, :, None, None], k[:, t, :, :, None]
        Hs = decay * Hs + bt * kt * kt.transpose(-1, -2)
        Gs = decay * Gs + bt * kt * v[:, t, :, None, :]
        xt = torch.linalg.solve(Hs + torch.diag_embed(lamb), q[:, t, :, :, None])
        x[:, t], o[:, t] = xt[..., 0], (Gs * xt).sum(-2)
        size[:, t] = Gs.norm(dim=-2) * xt.norm(dim=(-2, -1))[..., None]
    return x, o, size


def worst_token_and_channel(o, o_ref, size):
    """o's largest error on one token and on one value channel against `exact_solve`'s o_ref, each relative to its
    size of the product summed in the same norm."""
    d = o.double().cpu() - o_ref
    return ((d.norm(dim=-1) / size.norm(dim=-1)).max().item(),
            (d.norm(dim=(0, 1)) / size.norm(dim=(0, 1))).max().item())


def spread_errors(dtype, device, seed=0, B=1, T=256, H=2, K=64, V=64):
    """`chunk_mesa`'s output on inputs spread inside one chunk or tile: value channels scaled from 1e-6 to 1e2, and
    the first 40 tokens' beta 1e-6 times the others' (without an initial state, their outputs are 1e-6 times the
    later tokens'). Returns `worst_token_and_channel` against the float64 exact solve."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(dtype)
    v = (torch.randn(B, T, H, V, generator=gen) * 10 ** torch.linspace(-6, 2, V)).to(dtype)
    g = -0.2 * torch.rand(B, T, H, generator=gen)
    beta = torch.rand(B, T, H, generator=gen) * torch.where(torch.arange(T) < 40, 1e-6, 1.)[None, :, None]
    lamb = torch.rand(H, K, generator=gen) + 0.25
    o, _ = chunk_mesa(*(t.to(device) for t in (q, k, v, g, beta, lamb)), cg_steps=3 * K)
    return worst_token_and_channel(o, *exact_solve(q, k, v, g, beta, lamb)[1:])
