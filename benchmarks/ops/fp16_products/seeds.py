"""fp32-input outputs and gradients of chunk_mesa against float64 over six seeds (T = 1, 200 at K = 64; T = 130 at
K = 128), float16 against tf32 products in the CG kernel: the mean of each error and the largest.
Run from the repository root on a GPU (benchmarks/ops/fp16_products/README.md)."""
import sys, torch
sys.path.insert(0, 'tests/ops')
import triton.language as tl
import fla_mesa.ops.cg as cg
from test_chunk_gpu import grad_errors, grads_of, cuda
from mesa_inputs import make_inputs
from fla_mesa.ops import chunk_mesa, naive_recurrent_mesa
for T, K in ((1, 64), (200, 64), (130, 128)):
    rows = {'fp16': [], 'tf32': []}
    for seed in range(1, 7):
        inputs = make_inputs(1 if T != 200 else 2, T, 2, K, K, gate='mid', lamb_range=(0.5, 2.0), initial_state=True, seed=seed)
        gen = torch.Generator().manual_seed(seed + 100)
        B = inputs[0].shape[0]
        cot = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((B, T, 2, K), (B, 2, K, K), (B, 2, K, K))]
        o_ref, s_ref, g_ref = grads_of(naive_recurrent_mesa, *cuda(*inputs), cuda(*cot))
        f32 = [None if t is None else (tuple(x.float() for x in t) if isinstance(t, tuple) else t.float()) for t in inputs]
        for mode in ('fp16', 'tf32'):
            cg.products_dtype = (lambda dtype: tl.float16) if mode == 'fp16' else (lambda dtype: tl.float32)
            cg.kernel_floor = lambda: cg.TF32_FLOOR
            o, s, grads = grads_of(chunk_mesa, *cuda(*f32), cuda(*cot), cg_steps=3 * K)
            rows[mode].append([((o.double() - o_ref).norm() / o_ref.norm()).item(), *grad_errors(grads, g_ref).values()])
    names = ['o', 'dq', 'dk', 'dv', 'dg', 'dbeta', 'dlamb', 'dh_kk0', 'dh_kv0']
    for mode, r in rows.items():
        r = torch.tensor(r)
        print(f"T={T} K={K} {mode}: mean " + ' '.join(f"{n} {v:.1e}" for n, v in zip(names, r.mean(0).tolist())) + f" | max over all {r.max().item():.2e}")
