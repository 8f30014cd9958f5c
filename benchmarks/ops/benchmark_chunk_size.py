"""Times chunk_mesa at chunk sizes 64, 32 and 16 beside fla's chunk_mesa_net (one GPU).

Usage: python benchmarks/ops/benchmark_chunk_size.py [--B 8 --T 2048 --H 16 --dims 64 128]
A smaller chunk makes each CG iteration cheaper per token (the in-chunk products shrink with the chunk) and costs
more chunk states to write and read. Prints, per head dim, forward and forward+backward medians at 30 CG steps on
benchmark_mesa's inputs, each over fla's time, and the mean and largest CG iterations a token ran.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_mesa import inputs, shape_parser, timed  # noqa: E402

from fla_mesa.ops import chunk_mesa  # noqa: E402

CHUNK_SIZES = (64, 32, 16)


def rows(B, T, H, D, steps=30):
    """(name, fwd ms, fwd+bwd ms, mean iterations, largest iterations) for each chunk size, then fla's row."""
    from fla.ops.mesa_net import chunk_mesa_net
    fns = {f'chunk_mesa, chunk_size={cs}': (lambda *a, cs=cs: chunk_mesa(*a, cg_steps=steps, check_values=False,
                                                                         chunk_size=cs)[0]) for cs in CHUNK_SIZES}
    fns[f'fla chunk_mesa_net, {steps} CG'] = lambda q, k, v, g, b, l: chunk_mesa_net(q, k, v, g, b, l,
                                                                                     max_CG_iteration=steps)[0]
    out = []
    for (name, fn), cs in zip(fns.items(), CHUNK_SIZES + (None,)):
        f, _ = timed(fn, inputs(B, T, H, D, False), False)
        fb, _ = timed(fn, inputs(B, T, H, D, True), True)
        its = (None, None)
        if cs is not None:
            _, _, it = chunk_mesa(*inputs(B, T, H, D, False), cg_steps=steps, check_values=False, chunk_size=cs,
                                  return_cg_iters=True)
            its = (it.float().mean().item(), it.max().item())
        out.append((name, f, fb, *its))
    return out


def main():
    p = shape_parser()
    p.set_defaults(dims=[64, 128])
    args = p.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, B={args.B} T={args.T} H={args.H} bf16, "
          "30 CG steps at most")
    for D in args.dims:
        table = rows(args.B, args.T, args.H, D)
        fla = table[-1]
        print(f"\n## D = {D}\n| op | fwd ms | fwd / fla's | fwd+bwd ms | fwd+bwd / fla's | iterations, mean / max |"
              "\n|---|---|---|---|---|---|")
        for name, f, fb, mean, top in table:
            its = '' if mean is None else f'{mean:.2f} / {top}'
            print(f"| {name} | {f:.3f} | {f / fla[1]:.2f} | {fb:.3f} | {fb / fla[2]:.2f} | {its} |", flush=True)


if __name__ == '__main__':
    main()
