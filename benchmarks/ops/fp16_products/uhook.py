"""chunk_mesa's backward (fp32 inputs, T = 200, K = 64, seeds 1 and 2): the error of the adjoint solve's right-hand
side dx against G^T do, of u against the exact solve of that dx, and of dq = u, with float16 and with tf32
products in the CG kernel.
Run from the repository root on a GPU (benchmarks/ops/fp16_products/README.md)."""
import sys, torch
sys.path.insert(0, 'tests/ops')
import triton.language as tl
import fla_mesa.ops.cg as cg
import fla_mesa.ops.chunk as chunk
from test_chunk_gpu import grads_of, cuda
from mesa_inputs import make_inputs
from fla_mesa.ops import chunk_mesa, naive_recurrent_mesa
orig = chunk.chunk_cg_solve
rec = {}
def hook(b, *a, **kw):
    out = orig(b, *a, **kw)
    if kw.get('v') is None:
        rec['b'], rec['u'] = b.clone(), out[0].clone()
    return out
chunk.chunk_cg_solve = hook
T, K = 200, 64
for seed in (1, 2):
    inputs = make_inputs(2, T, 2, K, K, gate='mid', lamb_range=(0.5, 2.0), initial_state=True, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    cot = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((2, T, 2, K), (2, 2, K, K), (2, 2, K, K))]
    o_ref, s_ref, g_ref = grads_of(naive_recurrent_mesa, *cuda(*inputs), cuda(*cot))
    f32 = [None if t is None else (tuple(x.float() for x in t) if isinstance(t, tuple) else t.float()) for t in inputs]
    q, k, v, g, beta, lamb, state = inputs
    bs = {}
    for mode in ('fp16', 'tf32'):
        cg.products_dtype = (lambda dtype: tl.float16) if mode == 'fp16' else (lambda dtype: tl.float32)
        cg.kernel_floor = lambda: cg.TF32_FLOOR
        o, s, grads = grads_of(chunk_mesa, *cuda(*f32), cuda(*cot), cg_steps=3 * K)
        b, u = rec['b'].double().cpu(), rec['u'].double().cpu()
        bs[mode] = b
        # exact u for the recorded rhs
        ue = torch.empty_like(u); dxe = torch.empty_like(u)
        for bb in range(2):
            Hs = state[0][bb].double().clone(); Gs = state[1][bb].double().clone()
            for t in range(T):
                Gs = Gs * torch.exp(g[bb, t].double())[:, None, None] + beta[bb, t].double()[:, None, None] * torch.einsum('hi,hj->hij', k[bb, t].double(), v[bb, t].double())
                dxe[bb, t] = torch.einsum('hkv,hv->hk', Gs, cot[0][bb, t])
                Hs = Hs * torch.exp(g[bb, t].double())[:, None, None] + beta[bb, t].double()[:, None, None] * torch.einsum('hi,hj->hij', k[bb, t].double(), k[bb, t].double())
                ue[bb, t] = torch.linalg.solve(Hs + torch.diag_embed(lamb.double()), b[bb, t][..., None])[..., 0]
        r = lambda a, c: f"{((a - c).norm() / c.norm()).item():.3e}"
        print(seed, mode, 'u vs exact solve of its rhs', r(u, ue), 'rhs vs exact dx', r(b, dxe), 'dq err', r(grads[0].double().cpu(), g_ref[0].cpu()))
    print(seed, 'rhs fp16 vs tf32', r(bs['fp16'], bs['tf32']))
