"""Times the parts of the CG kernel (`fla_mesa/ops/cg.py`): loads and stores alone, the Jacobi start, the fused
output pass, 1, 4 and 16 iterations; then the time per iteration (with the output pass) over launch configurations.

Usage: python benchmarks/ops/benchmark_cg_parts.py    (GPU; B=8 T=2048 H=16, bf16, lamb = 0.01 and gamma close to 1
so that no token stops early; D = 128 and 64)
"""

import itertools

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from fla_mesa.ops.cg import OUTPUT_BV, cg_launch_config, chunk_cg_kernel, products_dtype
from fla_mesa.ops.chunk import scaled_states
from fla_mesa.ops.scaled_states import state_parts
from fla_mesa.ops.states import chunk_states_fwd

B, T, H = 8, 2048, 16


def inputs(D):
    """Inputs, chunk-start states and outputs of one head dim D, with lamb = 0.01 and forget gates near 1."""
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2
    gen = torch.Generator(device='cuda').manual_seed(0)
    q = F.normalize(torch.randn(B, T, H, D, device='cuda', generator=gen), dim=-1).bfloat16()
    k = F.normalize(torch.randn(B, T, H, D, device='cuda', generator=gen), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, device='cuda', generator=gen).bfloat16()
    g = F.logsigmoid(torch.randn(B, T, H, device='cuda', generator=gen) + 6.0)
    beta = torch.sigmoid(torch.randn(B, T, H, device='cuda', generator=gen))
    lamb = torch.full((H, D), 0.01, device='cuda')
    gc = chunk_local_cumsum(g, chunk_size=64, scale=RCP_LN2)
    # stored as chunk_mesa stores them for these inputs (float16 with column scales at D <= 64)
    h_kk, _ = chunk_states_fwd(k, k, beta, gc, scaled=scaled_states(k))
    h_kv, _ = chunk_states_fwd(k, v, beta, gc, scaled=scaled_states(k))
    x, o = torch.empty(B, T, H, D, dtype=torch.float32, device='cuda'), torch.empty_like(v)
    return dict(q=q, k=k, v=v, beta=beta, gc=gc, lamb=lamb, h_kk=h_kk, h_kv=h_kv, x=x, o=o)


def launch(d, steps, jacobi, output, BR, warps):
    """`steps` plain CG iterations (tolerance 0, so no token stops), with the Jacobi start and the output pass
    on or off, at BR rows per program and `warps` warps."""
    D = d['q'].shape[-1]
    (h_kk, hsc), (h_kv, hvsc) = state_parts(d['h_kk']), state_parts(d['h_kv'])
    chunk_cg_kernel[(triton.cdiv(T, 64) * (64 // BR), B * H)](
        d['q'], d['k'], d['beta'], d['gc'], h_kk, hsc, d['lamb'], d['x'], None,
        *((d['v'], h_kv, hvsc, d['o']) if output else (None,) * 4), None, None, tol_sq=0., steps=steps, T=T, H=H,
        K=D, V=D, BT=64, BR=BR, BK=D, BV=OUTPUT_BV, PDT=products_dtype(d['k'].dtype), SCALED_STATES=hsc is not None,
        SOLVE=steps > 0, JACOBI=jacobi, PRECOND=False, STORE_X=True, STORE_ITERS=False, OUTPUT=output, ADJOINT=False,
        IS_VARLEN=False,
        num_warps=warps, num_stages=1)


def main():
    for D in (128, 64):
        d = inputs(D)
        cfg = cg_launch_config(D)
        BR0, w0 = cfg['BR'], cfg['num_warps']
        print(f"== D={D} (shipped: {BR0} rows, {w0} warps)")
        for steps, jacobi, output in [(0, False, False), (0, True, False), (0, False, True), (0, True, True),
                                      (1, True, True), (4, True, False), (4, True, True), (16, True, False),
                                      (16, True, True)]:
            t = do_bench(lambda: launch(d, steps, jacobi, output, BR0, w0), warmup=10, rep=50)
            print(f"  steps={steps:2d} jacobi={jacobi:d} output={output:d}: {t:.3f} ms", flush=True)
        res = []
        for BR, w in itertools.product((16, 32, 64), (4, 8)):
            t4 = do_bench(lambda: launch(d, 4, True, True, BR, w), warmup=5, rep=30)
            t16 = do_bench(lambda: launch(d, 16, True, True, BR, w), warmup=5, rep=30)
            res.append((t16, t4, (t16 - t4) / 12, BR, w))
        for t16, t4, per, BR, w in sorted(res):
            print(f"  rows={BR} warps={w}: 16 it {t16:.3f} ms, 4 it {t4:.3f} ms, per it {per:.4f} ms", flush=True)


if __name__ == '__main__':
    main()
