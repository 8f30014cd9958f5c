"""Times the backward's two GLA gradient kernels alone over launch configurations (key and value tiles, warps, stages).

Usage: python benchmarks/ops/benchmark_gla_bwd.py [--B 8 --T 2048 --H 16 --dims 128 64]
Each kernel runs as the backward calls it: S's side (value v, output gradient do, both bf16) and H's side (value k in
bf16, output gradient u in float32, added onto S's buffers), on chunk states stored as `chunk_mesa` stores them for
bf16 inputs (float16 with column scales at D <= 64). Prints ms per call (`triton.testing.do_bench` median)
for each configuration and the sum over the two sides, marking `launch_configs`' choice. At D <= 64, where
`chunk_mesa`'s backward runs `mesa_backward`'s two kernels instead, it first prints theirs at 4 and 8 warps on the
same inputs, beside the four launches above at `launch_configs`.
"""

import itertools
import os
import sys
from unittest import mock

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_mesa import shape_parser  # noqa: E402

from fla_mesa.ops import gla_backward, mesa_backward  # noqa: E402
from fla_mesa.ops.chunk import scaled_states  # noqa: E402
from fla_mesa.ops.scaled_states import ScaledStates, state_parts  # noqa: E402


def inputs(B, T, H, D, chunk_size=64):
    NT = triton.cdiv(T, chunk_size)
    gen = torch.Generator(device='cuda').manual_seed(0)

    def randn(*s):
        return torch.randn(*s, generator=gen, device='cuda')

    d = dict(x=randn(B, T, H, D), k=randn(B, T, H, D).bfloat16(), v=randn(B, T, H, D).bfloat16(),
             beta=torch.rand(B, T, H, generator=gen, device='cuda'), do=randn(B, T, H, D).bfloat16(),
             u=randn(B, T, H, D), h=randn(B, NT, H, D, D), dh=randn(B, NT, H, D, D),
             lamb=torch.ones(H, D, device='cuda'))
    d['gc'] = -0.01 * torch.rand(B, T, H, generator=gen, device='cuda').cumsum(1)
    if scaled_states(d['k']):  # the states and their gradients as chunk_mesa stores them for these inputs
        d['h'], d['dh'] = ScaledStates.of(d['h']), ScaledStates.of(d['dh'])
    return d


def launch(kernel, d, side, BK, BV, num_warps, num_stages, chunk_size=64):
    """One call of `kernel` ('dqkg' or 'dw') for `side` ('S' or 'H') with this configuration."""
    B, T, H, K = d['x'].shape
    src, do = (d['v'], d['do']) if side == 'S' else (d['k'], d['u'])
    NT, n_rows, h = triton.cdiv(T, chunk_size), B * T * H, side == 'H'
    dh_, dhsc = state_parts(d['dh'])
    common = dict(cu_seqlens=None, chunk_indices=None, T=T, n_rows=n_rows, H=H, K=K, V=src.shape[-1], BT=chunk_size,
                  BK=BK, BV=BV, NEGATE=h, IS_VARLEN=False, ACCUMULATE=h, num_warps=num_warps, num_stages=num_stages)
    if kernel == 'dqkg':
        dq, dk = torch.empty_like(d['x']), torch.zeros_like(d['x'])
        dg = torch.zeros(triton.cdiv(K, BK), n_rows, device=dq.device)
        h_, hsc = state_parts(d['h'])
        gla_backward.gla_bwd_dqkg_kernel[(triton.cdiv(K, BK), NT, B * H)](
            d['x'], d['k'], src, d['beta'], do, h_, hsc, dh_, dhsc, d['gc'], dq, dk, dg, STORE_DQ=not h,
            SCALED_STATES=hsc is not None, SCALED_DH=dhsc is not None, **common)
    else:
        dw, dbeta = torch.zeros_like(src), torch.zeros(triton.cdiv(src.shape[-1], BV), n_rows, device=src.device)
        gla_backward.gla_bwd_dw_kernel[(triton.cdiv(src.shape[-1], BV), NT, B * H)](
            d['x'], d['k'], src, d['beta'], do, dh_, dhsc, d['gc'], dw, dw, dbeta, SCALED_DH=dhsc is not None, **common)


def launch_fused(kernel, d):
    """One call of `mesa_backward`'s `kernel` ('dk' or 'dw') on these inputs (D <= 64, scaled states; both sides'
    states and state gradients are `h` and `dh`)."""
    h, dh = d['h'], d['dh']
    if kernel == 'dk':
        mesa_backward.mesa_bwd_dk(d['x'], d['k'], d['v'], d['beta'], d['do'], d['u'], d['lamb'], h, h, dh, dh, d['gc'])
    else:
        mesa_backward.mesa_bwd_dw(d['k'], d['x'], d['k'], d['v'], d['beta'], d['do'], d['u'], dh, dh, d['gc'], d['x'])


def fused_table(d, D):
    """ms per call of `mesa_backward`'s kernels at 4 and 8 warps, and of the four GLA launches they replace."""
    rows = []
    for warps in (4, 8):
        with mock.patch.object(mesa_backward, 'launch_config', lambda w=warps: dict(num_warps=w, num_stages=1)):
            rows.append((warps, [do_bench(lambda k=k: launch_fused(k, d), warmup=10, rep=40)
                                 for k in ('dk', 'dw')]))
    dqkg, dw = gla_backward.launch_configs(D, D)
    four = sum(do_bench(lambda k=k, s=s, c=c: launch(k, d, s, c['BK'], c['BV'], c['num_warps'], c['num_stages']),
                        warmup=10, rep=40) for k, c in (('dqkg', dqkg), ('dw', dw)) for s in ('S', 'H'))
    print(f"\n## D = {D}, `mesa_backward`'s kernels (ms per call; the four GLA launches at `launch_configs`: "
          f"{four:.4f})\n| warps | dk | dw | sum |\n|---|---|---|---|")
    for warps, ms in rows:
        mark = ' (`launch_config`)' if warps == mesa_backward.launch_config()['num_warps'] else ''
        print(f"| {warps} | {' | '.join(f'{t:.4f}' for t in ms)} | {sum(ms):.4f}{mark} |")


def configs(D):
    tiles = [(64, 64), (64, 32), (32, 64), (32, 32)] + ([(128, 64), (128, 32), (64, 128)] if D >= 128 else [])
    cfgs = [(bk, bv, w, s) for (bk, bv), w, s in itertools.product(tiles, (4, 8), (1, 2))] + [(64, 64, 4, 3),
                                                                                            (64, 64, 8, 3)]
    return [c for c in cfgs if max(c[:2]) <= max(16, triton.next_power_of_2(D))]


def main():
    args = shape_parser().parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, "
          f"B={args.B} T={args.T} H={args.H}")
    for D in args.dims:
        d = inputs(args.B, args.T, args.H, D)
        if scaled_states(d['k']):
            fused_table(d, D)
        chosen = dict(zip(('dqkg', 'dw'), gla_backward.launch_configs(D, D)))
        for kernel in ('dqkg', 'dw'):
            pick = chosen[kernel]
            pick = (pick['BK'], pick['BV'], pick['num_warps'], pick['num_stages'])
            rows = []
            for cfg in configs(D):
                ms = []
                for side in ('S', 'H'):
                    def run(side=side):
                        launch(kernel, d, side, *cfg)
                    ms.append(do_bench(run, warmup=10, rep=40))
                rows.append((cfg, ms))
            rows.sort(key=lambda r: sum(r[1]))
            print(f"\n## D = {D}, {kernel} kernel (ms per call)\n| BK | BV | warps | stages | S side | H side | sum |")
            print("|---|---|---|---|---|---|---|")
            for cfg, (s, h) in rows:
                mark = ' (`launch_configs`)' if cfg == pick else ''
                print(f"| {' | '.join(map(str, cfg))} | {s:.4f} | {h:.4f} | {s + h:.4f}{mark} |")


if __name__ == '__main__':
    main()
