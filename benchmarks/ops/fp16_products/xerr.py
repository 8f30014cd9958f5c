"""The CG kernel's x and fused output o against the float64 solve (fp32 inputs, K = 64, T = 1, 64 and the first
chunk of 200), with float16 products, tf32 products, and tf32 at float32's eps floor.
Run from the repository root on a GPU (benchmarks/ops/fp16_products/README.md)."""
import math, sys, torch
sys.path.insert(0, 'tests/ops')
from mesa_inputs import exact_solve, make_inputs
import triton.language as tl
import fla_mesa.ops.cg as cg
DEV = 'cuda' if torch.cuda.is_available() else 'cpu'
for T in (1, 64, 200):
    q, k, v, g, beta, lamb, state = make_inputs(1, T, 2, 64, 64, gate='mid', lamb_range=(0.5, 2.0), initial_state=True, dtype=torch.float32, seed=1)
    xe, oe, _ = exact_solve(q, k, v, g, beta, lamb, *state)
    if T > 64:
        q, k, v, beta, g, xe, oe = q[:, :64], k[:, :64], v[:, :64], beta[:, :64], g[:, :64], xe[:, :64], oe[:, :64]
    gc = (torch.cumsum(g, 1) / math.log(2)).contiguous().to(DEV)
    h = state[0][:, None].contiguous().to(DEV)
    for mode in ('fp16', 'tf32', 'ieee'):
        cg.products_dtype = (lambda dtype: tl.float16) if mode == 'fp16' else (lambda dtype: tl.float32)
        cg.kernel_floor = (lambda: cg.TF32_FLOOR) if mode != 'ieee' else (lambda: 2.0 ** -23)
        x, it, _ = cg.chunk_cg_solve(q.to(DEV), k.to(DEV), beta.to(DEV), gc, h, lamb.to(DEV), 192, None, 'jacobi', True, None, None, 64)
        x2, it2, o = cg.chunk_cg_solve(q.to(DEV), k.to(DEV), beta.to(DEV), gc, h, lamb.to(DEV), 192, None, 'jacobi', True, None, None, 64, v.to(DEV), state[1][:, None].contiguous().to(DEV))
        r = lambda a, b: f"{((a.double().cpu() - b).norm() / b.norm()).item():.3e}"
        print(mode, T, 'x rel err', r(x, xe), 'with output', r(x2, xe), 'o', r(o, oe), 'iters', it.float().mean().item())
