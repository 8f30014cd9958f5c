"""The CG kernel's stopping floor: errors, iterations and speed of chunk_mesa over floors (one GPU).

Usage: python benchmarks/ops/benchmark_cg_floor.py [--floors 23 16 14 12 10]
Without `cg_tol`, the CUDA kernel stops a token at a relative residual of `cg.TF32_FLOOR` (2^-16), the precision of
its tf32 products. This sets the floor to 2^-n for each n of `--floors` (23: float32's eps, the floor before) and
prints, on one sequence (B=1 T=2048 H=4, bf16), the mean forward iterations and the error of o and of every gradient
against the float64 exact solve, for head dims 128 and 64 and lamb 1, 0.25-5 and 0.05; then forward and
forward+backward times (B=8 T=2048 H=16, lamb 1) over fla's chunk_mesa_net at 30 CG, in one process.
"""

import argparse
import os
import sys

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.join(ROOT, 'tests', 'ops')]
from benchmark_mesa import inputs, ops, timed  # noqa: E402
from mesa_inputs import grads_on, rel  # noqa: E402  (the GPU floor test's output-and-gradients harness)

import fla_mesa.ops.cg as cg  # noqa: E402
from fla_mesa.ops import chunk_mesa, naive_recurrent_mesa  # noqa: E402

NAMES = ('o', 'dq', 'dk', 'dv', 'dg', 'dbeta', 'dlamb')


def errors(D, lamb_range, floors, T=2048, H=4):
    inp = [t.detach() for t in inputs(1, T, H, D, False, seed=1, lamb_range=lamb_range)]
    do = torch.randn(1, T, H, D, device='cuda', generator=torch.Generator(device='cuda').manual_seed(5))
    ref, _ = grads_on(naive_recurrent_mesa, inp, do, torch.float64)
    for n in floors:
        cg.TF32_FLOOR = 2. ** -n
        out, (_, iters) = grads_on(lambda *a: chunk_mesa(*a, cg_steps=30, return_cg_iters=True), inp, do)
        iters = iters.float().mean().item()
        print(f"| {D} | {lamb_range[0]:g}-{lamb_range[1]:g} | 2^-{n} | {iters:.2f} | "
              + ' | '.join(f'{rel(a, b):.3e}' for a, b in zip(out, ref)) + ' |', flush=True)


def speed(D, floors):
    args = inputs(8, 2048, 16, D, True)
    rows, _ = ops(30)  # benchmark_mesa's rows: ours as MesaAttention calls it, and fla's at 30 CG
    ours, fla = rows['chunk_mesa, 30 CG'], rows['fla chunk_mesa_net, 30 CG']
    base = timed(fla, args, False)[0], timed(fla, args, True)[0]
    print(f"| {D} | fla chunk_mesa_net, 30 CG | {base[0]:.3f} | {base[1]:.3f} | | |")
    for n in floors:
        cg.TF32_FLOOR = 2. ** -n
        t = timed(ours, args, False)[0], timed(ours, args, True)[0]
        print(f"| {D} | chunk_mesa, floor 2^-{n} | {t[0]:.3f} | {t[1]:.3f} | {t[0] / base[0]:.3f} | "
              f"{t[1] / base[1]:.3f} |", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--floors', type=int, nargs='+', default=[23, 16, 14, 12, 10], help="n of each floor 2^-n")
    args = p.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n| D | lamb | floor | iterations | "
          + ' | '.join(NAMES) + ' |\n|' + '---|' * (4 + len(NAMES)))
    for D, lamb_range in ((128, (1., 1.)), (128, (0.25, 5.)), (128, (0.05, 0.05)), (64, (1., 1.))):
        errors(D, lamb_range, args.floors)
    print("\n| D | op | fwd ms | fwd+bwd ms | fwd / fla | fwd+bwd / fla |\n|---|---|---|---|---|---|")
    for D in (128, 64):
        speed(D, args.floors)


if __name__ == '__main__':
    main()
