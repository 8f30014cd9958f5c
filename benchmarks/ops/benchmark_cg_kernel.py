"""Times the CG kernel alone: milliseconds and achieved rate per CG iteration, over launch configurations.

Usage: python benchmarks/ops/benchmark_cg_kernel.py [--B 8 --T 2048 --H 16 --dims 128 64] [--baseline FILE]
Inputs are hard (lamb = 0.01, gamma close to 1) so that no token stops early: the time per iteration is the
slope between 4 and 16 iterations. `--baseline FILE` times another version of `fla_mesa/ops/cg.py` (say, from
`git show REV:fla_mesa/ops/cg.py > FILE`) at its own defaults in the same process, for A/B comparisons.
"""

import importlib.util
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_mesa import shape_parser  # noqa: E402

from fla_mesa.ops import cg  # noqa: E402


def inputs(B, T, H, K, chunk_size=64):
    from fla.ops.common.chunk_h import chunk_fwd_h
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2
    gen = torch.Generator(device='cuda').manual_seed(0)
    q = F.normalize(torch.randn(B, T, H, K, device='cuda', generator=gen), dim=-1).bfloat16()
    k = F.normalize(torch.randn(B, T, H, K, device='cuda', generator=gen), dim=-1).bfloat16()
    g = F.logsigmoid(torch.randn(B, T, H, device='cuda', generator=gen) + 6.0)
    beta = torch.sigmoid(torch.randn(B, T, H, device='cuda', generator=gen))
    lamb = torch.full((H, K), 0.01, device='cuda')
    gc = chunk_local_cumsum(g, chunk_size=chunk_size, scale=RCP_LN2)
    kf = k.float()
    h_kk, _ = chunk_fwd_h(k=kf, v=kf * beta[..., None], g=gc, h0=None, output_final_state=False,
                          chunk_size=chunk_size, states_in_fp32=True)
    return q, k, beta, gc, h_kk, lamb


def launch(mod, args, steps, BR=None, num_warps=None):
    """Runs `mod`'s kernel for exactly `steps` iterations (tolerance 0) and returns the per-token counts."""
    q, k, beta, gc, h_kk, lamb = args
    B, T, H, K = q.shape
    if hasattr(mod, 'cg_launch_config'):
        cfg = mod.cg_launch_config(K)
    else:  # versions before cg_launch_config chose these
        BK = max(16, triton.next_power_of_2(K))
        cfg = dict(BR=min(64, 4096 // BK), BK=BK, num_warps=8 if BK >= 128 else 4)
    BK, BR, num_warps = cfg['BK'], BR or cfg['BR'], num_warps or cfg['num_warps']
    x = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    iters = torch.empty(B, T, H, dtype=torch.int32, device=q.device)
    # kernels since the fused output pass take (v, h_kv, o) and V, BV, OUTPUT: off here (the solve alone)
    fused = 'OUTPUT' in mod.chunk_cg_kernel.arg_names
    out_args, out_opts = ((None,) * 3, dict(V=1, BV=16, OUTPUT=False)) if fused else ((), {})
    if 'PRECOND' in mod.chunk_cg_kernel.arg_names:  # kernels since preconditioned CG: plain CG, SOLVE on
        out_opts.update(SOLVE=steps > 0, PRECOND=False)
    if 'PDT' in mod.chunk_cg_kernel.arg_names:  # kernels since float16 products: chunk_mesa's for these inputs
        out_opts.update(PDT=mod.products_dtype(q.dtype))
    states = (h_kk,)
    if 'SCALED_STATES' in mod.chunk_cg_kernel.arg_names:  # kernels since float16 states: chunk_mesa's for the inputs
        from fla_mesa.ops.chunk import scaled_states
        from fla_mesa.ops.scaled_states import ScaledStates
        scaled = scaled_states(q)  # q's dtype and head dim are k's
        states = tuple(ScaledStates.of(h_kk)) if scaled else (h_kk, None)
        out_args = out_args[:2] + (None,) + out_args[2:]
        out_opts.update(SCALED_STATES=scaled)
    if 'STORE_X' in mod.chunk_cg_kernel.arg_names:  # kernels since the no-grad forward: x written, as for training
        out_opts.update(STORE_X=True)
    if 'ADJOINT' in mod.chunk_cg_kernel.arg_names:  # kernels since the adjoint's right-hand side: b given
        out_opts.update(ADJOINT=False)
    mod.chunk_cg_kernel[(triton.cdiv(T, 64) * (64 // BR), B * H)](
        q, k, beta, gc, *states, lamb, x, iters, *out_args, None, None, tol_sq=0., steps=steps, T=T, H=H, K=K,
        BT=64, BR=BR, BK=BK, JACOBI=True, STORE_ITERS=True, IS_VARLEN=False, **out_opts,
        num_warps=num_warps, num_stages=1)
    return iters


def per_iteration(mod, args, **cfg):
    t = [do_bench(lambda: launch(mod, args, n, **cfg), warmup=10, rep=50) for n in (4, 16)]
    done = launch(mod, args, 16, **cfg).float().mean().item()
    return (t[1] - t[0]) / 12, t[0], done


def main():
    p = shape_parser()
    p.add_argument('--baseline', help='another cg.py to time side by side')
    args = p.parse_args()
    mods = [('this checkout', cg)]
    if args.baseline:
        spec = importlib.util.spec_from_file_location('cg_baseline', args.baseline)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
        mods.append((f'baseline {args.baseline}', base))
    print(f"device {torch.cuda.get_device_name()}, triton {triton.__version__}, B={args.B} T={args.T} H={args.H}")
    print("\n| D | kernel | rows/program | warps | ms / iteration | ms at 4 iterations | iterations run "
          "| TFLOP/s |\n|---|---|---|---|---|---|---|---|")
    for D in args.dims:
        data = inputs(args.B, args.T, args.H, D)
        tokens = args.B * args.T * args.H
        for name, mod in mods:
            cfgs = [(None, None)] if mod is not cg else [(br, w) for br in (16, 32, 64) for w in (4, 8)]
            for BR, w in cfgs:
                try:
                    ms, ms4, done = per_iteration(mod, data, BR=BR, num_warps=w)
                except Exception as e:  # a configuration that does not fit (shared memory, registers)
                    print(f"| {D} | {name} | {BR} | {w} | failed: {type(e).__name__} | | | |")
                    continue
                flops = 2 * tokens * (D * D + 2 * 64 * D)   # p @ H_c and the two in-chunk products
                print(f"| {D} | {name} | {BR or 'default'} | {w or 'default'} | {ms:.3f} | {ms4:.3f} | {done:.1f} "
                      f"| {flops / ms / 1e9:.0f} |", flush=True)


if __name__ == '__main__':
    main()
