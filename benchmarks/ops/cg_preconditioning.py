"""CPU study: would Jacobi-preconditioned CG cut `chunk_mesa`'s CG iterations? (no GPU needed)

    python benchmarks/ops/cg_preconditioning.py [--T 1024] [--H 2] [--D 128]

The shipped solver is plain CG started at the Jacobi point x_0 = q / diag(H_t + Lambda) (the paper's start).
Preconditioned CG with M = diag(H_t + Lambda) uses the same diagonal at every iteration (z = r / d), for one more
[tokens, K] vector and one division an iteration. This script runs both on the chunked PyTorch twin of the op
(`torch_chunk_cg_solve`, float32, chunk 64, the same inputs for both) and prints the mean and largest
iterations per token until ||r|| <= max(tol, eps_fp32) ||r_0|| (the op's stopping rule), capped at `--steps`.
The inputs: `benchmark_mesa.py`'s (unit keys and queries rounded to bf16, gamma mostly in (0.95, 1), beta
uniform-ish), with Lambda and the keys' spread across channels varied: isotropic keys and one lambda (the
benchmark's), then lambda spread over channels, then keys whose channels carry different energy.
"""

import argparse
import math

import torch
import torch.nn.functional as F

from fla_mesa.ops.cg import torch_chunk_cg_solve
from fla_mesa.ops.torch_chunk import chunk_cumsum, chunk_states

C = 64


def solve_iterations(q, k, g, beta, lamb, steps, tol, precondition):
    """x_t and the CG iterations per token for (H_t + diag(lamb)) x_t = q_t, `[1, T, H, D]` float32 inputs (T a
    multiple of 64), Jacobi start, plain or Jacobi-preconditioned: the op's PyTorch twin `torch_chunk_cg_solve`."""
    gc = chunk_cumsum(g, C)
    h_kk, _ = chunk_states(k, beta[..., None] * k, gc, None, C)
    x, iters = torch_chunk_cg_solve(q, k, beta, gc, h_kk, lamb, steps, tol, 'jacobi', True, C,
                                    'jacobi' if precondition else 'none')
    return x, iters.float()


def inputs(T, H, D, key_spread, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(D).uniform_(-key_spread, key_spread, generator=gen))
    q = F.normalize(torch.randn(1, T, H, D, generator=gen), dim=-1).bfloat16().float()
    k = F.normalize(torch.randn(1, T, H, D, generator=gen) * scale, dim=-1).bfloat16().float()
    g = F.logsigmoid(torch.randn(1, T, H, generator=gen) + 4.0)
    beta = torch.sigmoid(torch.randn(1, T, H, generator=gen))
    return q, k, g, beta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--T', type=int, default=1024)
    p.add_argument('--H', type=int, default=2)
    p.add_argument('--D', type=int, default=128)
    p.add_argument('--steps', type=int, default=40)
    args = p.parse_args(argv)
    T, H, D = args.T, args.H, args.D
    gen = torch.Generator().manual_seed(1)
    spread = torch.exp(torch.empty(H, D).uniform_(math.log(0.25), math.log(5.0), generator=gen))
    cases = [('unit lambda, isotropic keys', torch.ones(H, D), 0.0),
             ('lambda 0.25, isotropic keys', torch.full((H, D), 0.25), 0.0),
             ('lambda 0.25-5 over channels', spread, 0.0),
             ('unit lambda, key channels e^+-1.5', torch.ones(H, D), 1.5),
             ('lambda 0.25-5, key channels e^+-1.5', spread, 1.5)]
    print(f"T={T} H={H} D={D}, chunk {C}, float32, at most {args.steps} iterations; mean / largest per token")
    print("| inputs | tol | Jacobi start (shipped) | Jacobi-preconditioned CG |")
    print("|---|---|---|---|")
    for name, lamb, key_spread in cases:
        q, k, g, beta = inputs(T, H, D, key_spread)
        for tol in (None, 1e-3):
            plain, pcg = (solve_iterations(q, k, g, beta, lamb, args.steps, tol, pre)[1] for pre in (False, True))
            print(f"| {name} | {tol or 'fp32 floor'} | {plain.mean():.2f} / {plain.max():.0f} | "
                  f"{pcg.mean():.2f} / {pcg.max():.0f} |", flush=True)


if __name__ == '__main__':
    main()
