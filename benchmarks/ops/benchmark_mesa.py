"""Times chunk_mesa beside fla's chunk_mesa_net, chunk_simple_gla and chunk_gated_delta_rule (one GPU).

Usage: python benchmarks/ops/benchmark_mesa.py [--B 8 --T 2048 --H 16 --dims 128 64
                                                --parts speed accuracy gradients decode] [--graphs] [--no-baselines]
                                                [--lamb LO HI]
Prints, per head dim, forward and forward+backward medians (triton.testing.do_bench), our time over
fla's MesaNet at equal CG steps, peak memory of forward+backward, the output error against a float64
exact solve for fixed steps and tolerances, every gradient's error against the float64 exact solve's, and
decoding tokens/s (eager calls, and CUDA graphs without the host's launch overhead); with `--graphs`, the
30-step rows' GPU times from CUDA graphs too. Ratios within one run are what to quote.
"""

import argparse
import functools
import math
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from fla_mesa.ops import chunk_mesa, fused_recurrent_mesa, naive_recurrent_mesa

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'tests', 'ops'))
from mesa_inputs import grads_on, rel  # noqa: E402  (the tests' gradient harness and relative error)


def inputs(B, T, H, D, requires_grad, seed=0, lamb_range=(1.0, 1.0)):
    gen = torch.Generator(device='cuda').manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=gen, device='cuda')

    q = F.normalize(randn(B, T, H, D), dim=-1).bfloat16()
    k = F.normalize(randn(B, T, H, D), dim=-1).bfloat16()
    v = randn(B, T, H, D).bfloat16()
    g = F.logsigmoid(randn(B, T, H) + 4.0)          # gamma mostly in (0.95, 1): long memory, hard solves
    beta = torch.sigmoid(randn(B, T, H))
    lo, hi = (math.log(x) for x in lamb_range)  # lamb log-uniform over (head, channel); (1, 1) gives ones
    lamb = torch.exp(lo + (hi - lo) * torch.rand(H, D, generator=gen, device='cuda'))
    ts = [q, k, v, g, beta, lamb]
    return [t.requires_grad_(requires_grad) for t in ts]


def call(fn, args, backward):
    """One call of `fn(*args)`, and of its backward with all-ones output gradients if `backward`."""
    def run():
        out = fn(*args)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def timed(fn, args, backward):
    run = call(fn, args, backward)
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    return do_bench(run, warmup=25, rep=100), peak


# with the zero start, the tolerance whose output error equals fla's 30-step error here (the Jacobi start's is 1e-2)
ZERO_START_TOL = 3e-3


def ops(steps):
    """Our rows run as `MesaAttention` calls the op, without the two value checks (each waits for the GPU, and fla's
    ops have none); one row at 30 steps keeps them, for their cost."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.mesa_net import chunk_mesa_net
    from fla.ops.simple_gla import chunk_simple_gla

    def mesa(q, k, v, g, b, l, **kw):
        return chunk_mesa(q, k, v, g, b, l, check_values=kw.pop('check_values', False), **kw)[0]
    return {
        f'chunk_mesa, {steps} CG': lambda *a: mesa(*a, cg_steps=steps),
        **{f'chunk_mesa, {steps} CG, cg_tol={tol:g}': (lambda *a, tol=tol: mesa(*a, cg_steps=steps, cg_tol=tol))
           for tol in ((1e-2, 1e-3) if steps == 30 else ())},
        # at 30 steps only: the zero start, also at the tolerance whose error equals fla's there, and three options
        **({f'chunk_mesa, {steps} CG, cg_init=zero': lambda *a: mesa(*a, cg_steps=steps, cg_init='zero'),
            f'chunk_mesa, {steps} CG, cg_tol={ZERO_START_TOL:g}, cg_init=zero':
                lambda *a: mesa(*a, cg_steps=steps, cg_tol=ZERO_START_TOL, cg_init='zero'),
            f'chunk_mesa, {steps} CG, with the value checks': lambda *a: mesa(*a, cg_steps=steps, check_values=True),
            f'chunk_mesa, {steps} CG, fp32_backward=False': lambda *a: mesa(*a, cg_steps=steps, fp32_backward=False),
            f'chunk_mesa, {steps} CG, cg_precond=jacobi': lambda *a: mesa(*a, cg_steps=steps, cg_precond='jacobi')}
           if steps == 30 else {}),
        # last: on a fresh machine its backward can autotune for minutes at D=64, after our rows have printed
        f'fla chunk_mesa_net, {steps} CG': lambda q, k, v, g, b, l: chunk_mesa_net(q, k, v, g, b, l, max_CG_iteration=steps)[0],
    }, {
        'fla chunk_simple_gla': lambda q, k, v, g, b, l: chunk_simple_gla(q, k, v, g, scale=1.0)[0],
        'fla chunk_gated_delta_rule': lambda q, k, v, g, b, l: chunk_gated_delta_rule(q, k, v, g, b.to(q.dtype))[0],
        'chunk_mesa, 0 CG (GLA)': lambda *a: mesa(*a, cg_steps=0),
    }


def accuracy(D, H=4, T=2048, tols=(1e-2, 3e-3, 1e-3, 1e-4)):
    """Relative error of o against a float64 exact solve, and mean CG iterations, on one sequence."""
    from fla.ops.mesa_net import chunk_mesa_net
    q, k, v, g, beta, lamb = [t.detach() for t in inputs(1, T, H, D, False, seed=1)]
    ref, _ = naive_recurrent_mesa(*(t.double() for t in (q, k, v, g, beta, lamb)))
    err = functools.partial(rel, b=ref)
    rows = [('bf16 rounding of the exact output', err(ref.bfloat16()), None)]
    for steps in (10, 30):
        rows.append((f'fla chunk_mesa_net, {steps} CG', err(chunk_mesa_net(q, k, v, g, beta, lamb, max_CG_iteration=steps)[0]), steps))
        rows.append((f'chunk_mesa, {steps} CG', err(chunk_mesa(q, k, v, g, beta, lamb, cg_steps=steps)[0]), steps))
    for init, tol in [('jacobi', t) for t in tols] + [('zero', t) for t in (None, *tols)]:
        o, _, it = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=30, cg_tol=tol, cg_init=init, return_cg_iters=True)
        rows.append((f"chunk_mesa, {'30 CG' if tol is None else f'cg_tol={tol:g}'}"
                     f"{', cg_init=zero' if init == 'zero' else ''}", err(o), it.float().mean().item()))
    return rows


def grad_accuracy(D, H=4, T=2048, steps=30):
    """Relative error of every gradient against the float64 exact solve's, on one sequence with a random output
    gradient; the first row is each exact gradient rounded to bf16 (the floor for q, k, v)."""
    from fla.ops.mesa_net import chunk_mesa_net
    names = ('q', 'k', 'v', 'g', 'beta', 'lamb')
    inp = [t.detach() for t in inputs(1, T, H, D, False, seed=1)]
    do = torch.randn(1, T, H, D, device='cuda', generator=torch.Generator(device='cuda').manual_seed(5))

    def grads(fn, dtype=None):
        return grads_on(fn, inp, do, dtype)[0][1:]

    ref = grads(naive_recurrent_mesa, torch.float64)

    def errs(gs):
        return [rel(a, b) for a, b in zip(gs, ref)]
    return names, [
        ('exact gradient rounded to bf16', errs([r.bfloat16() for r in ref])),
        (f'fla chunk_mesa_net, {steps} CG', errs(grads(lambda *a: chunk_mesa_net(*a, max_CG_iteration=steps)))),
        (f'chunk_mesa, {steps} CG', errs(grads(lambda *a: chunk_mesa(*a, cg_steps=steps)))),
        (f'chunk_mesa, {steps} CG, fp32_backward=False',
         errs(grads(lambda *a: chunk_mesa(*a, cg_steps=steps, fp32_backward=False)))),
    ]


def graph_bench(fn):
    """do_bench of a CUDA graph of `fn`: the GPU time without the host's launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=200)


@torch.no_grad()
def decode(D, H=16, batches=(1, 64), steps=30):
    """One decoding step per call: tokens/s from eager calls (host overhead included) and from CUDA graphs."""
    from fla.ops.mesa_net import mesa_net_decoding_one_step
    rows = []
    for B in batches:
        q, k, v, g, beta, lamb = [t.detach() for t in inputs(B, 1, H, D, False, seed=2)]
        a = torch.randn(B, H, D, D, device='cuda') / D
        h_kk, h_kv = a @ a.mT, torch.randn(B, H, D, D, device='cuda')

        def fla():
            return mesa_net_decoding_one_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], lamb, beta[:, 0], h_kk, h_kv,
                                              max_CG_iteration=steps)

        def ours():
            # as MesaAttention calls it: without the value checks, which wait for the GPU (fla's op has none)
            return fused_recurrent_mesa(q, k, v, g, beta, lamb, cg_steps=steps, check_values=False,
                                        initial_state=(h_kk, h_kv), output_final_state=True)

        iters = fused_recurrent_mesa(q, k, v, g, beta, lamb, cg_steps=steps, initial_state=(h_kk, h_kv),
                                     return_cg_iters=True)[2].float().mean().item()
        rows.append((B, *(B / do_bench(fn, warmup=25, rep=200) * 1e3 for fn in (fla, ours)),
                     *(B / graph_bench(fn) * 1e3 for fn in (fla, ours)), iters))
    return rows


def graph_timed(fn, args, backward):
    """`timed`'s time from a CUDA graph of the call (and of its backward): the GPU time without the host's launch
    overhead, or None where the call cannot be captured."""
    try:
        return graph_bench(call(fn, args, backward))
    except RuntimeError as e:
        print(f"(no CUDA graph: {str(e).splitlines()[0][:100]})")
        return None


GRAPHED = ('chunk_mesa, 30 CG', 'chunk_mesa, 30 CG, fp32_backward=False', 'chunk_mesa, 30 CG, cg_tol=0.01',
           'chunk_mesa, 30 CG, cg_init=zero', f'chunk_mesa, 30 CG, cg_tol={ZERO_START_TOL:g}, cg_init=zero',
           'chunk_mesa, 30 CG, cg_precond=jacobi', 'fla chunk_mesa_net, 30 CG')


def speed(D, args):
    """Forward and forward+backward times and peak memory, and our time over fla's MesaNet; with `args.graphs`, the
    30-step rows also from CUDA graphs."""
    print(f"\nlamb log-uniform in {tuple(args.lamb)} over (head, channel)"
          "\n| op | fwd ms | fwd+bwd ms | peak GiB (fwd+bwd) |\n|---|---|---|---|")
    times, graphed = {}, {}
    make = functools.partial(inputs, lamb_range=tuple(args.lamb))
    for steps in (30, 10):
        mesa, _ = ops(steps)
        for name, fn in mesa.items():
            f, _ = timed(fn, make(args.B, args.T, args.H, D, False), False)
            fb, mem = timed(fn, make(args.B, args.T, args.H, D, True), True)
            times[name] = (f, fb)
            print(f"| {name} | {f:.2f} | {fb:.2f} | {mem:.2f} |", flush=True)
            if args.graphs and name in GRAPHED:
                graphed[name] = tuple(graph_timed(fn, make(args.B, args.T, args.H, D, b), b) for b in (False, True))
                print("|   the same, CUDA graph | " + " | ".join('n/a' if t is None else f'{t:.2f}' for t in graphed[name])
                      + " | |", flush=True)
    for name, fn in ({} if args.no_baselines else ops(0)[1]).items():
        f, _ = timed(fn, make(args.B, args.T, args.H, D, False), False)
        fb, mem = timed(fn, make(args.B, args.T, args.H, D, True), True)
        print(f"| {name} | {f:.2f} | {fb:.2f} | {mem:.2f} |")
    print("\n| ratio ours / fla chunk_mesa_net | fwd | fwd+bwd |\n|---|---|---|")
    for steps in (30, 10):
        ours, fla = times[f'chunk_mesa, {steps} CG'], times[f'fla chunk_mesa_net, {steps} CG']
        print(f"| {steps} CG | {ours[0] / fla[0]:.2f} | {ours[1] / fla[1]:.2f} |")
    fla = times['fla chunk_mesa_net, 30 CG']
    for tol in (1e-2, 1e-3):
        ours = times[f'chunk_mesa, 30 CG, cg_tol={tol:g}']
        print(f"| cg_tol={tol:g} vs fla's 30 CG | {ours[0] / fla[0]:.2f} | {ours[1] / fla[1]:.2f} |")
    ours = times[f'chunk_mesa, 30 CG, cg_tol={ZERO_START_TOL:g}, cg_init=zero']
    print(f"| cg_tol={ZERO_START_TOL:g}, cg_init=zero vs fla's 30 CG | {ours[0] / fla[0]:.2f} "
          f"| {ours[1] / fla[1]:.2f} |")
    ours = times['chunk_mesa, 30 CG, cg_precond=jacobi']
    print(f"| cg_precond=jacobi vs fla's 30 CG | {ours[0] / fla[0]:.2f} | {ours[1] / fla[1]:.2f} |")
    if graphed:
        def fmt(t, over=1.0):  # 'n/a' where a graph could not be captured
            return 'n/a' if t is None or over is None else f'{t / over:.2f}'
        fla = graphed.get('fla chunk_mesa_net, 30 CG', (None, None))
        print("\n| CUDA graph (GPU time), 30 CG at most | fwd ms | fwd+bwd ms | fwd / fla's | fwd+bwd / fla's |"
              "\n|---|---|---|---|---|")
        for name, (f, fb) in graphed.items():
            print(f"| {name} | {fmt(f)} | {fmt(fb)} | {fmt(f, fla[0])} | {fmt(fb, fla[1])} |")


def shape_parser():
    """The op benchmarks' common options: batch, length, heads and the head dims to run."""
    p = argparse.ArgumentParser()
    p.add_argument('--B', type=int, default=8)
    p.add_argument('--T', type=int, default=2048)
    p.add_argument('--H', type=int, default=16)
    p.add_argument('--dims', type=int, nargs='+', default=[128, 64])
    return p


def main():
    p = shape_parser()
    parts = ('speed', 'accuracy', 'gradients', 'decode')
    p.add_argument('--parts', nargs='+', choices=parts, default=list(parts))
    p.add_argument('--graphs', action='store_true', help="also time the 30-step rows from CUDA graphs (GPU time)")
    p.add_argument('--no-baselines', action='store_true', help="skip the GLA, Gated DeltaNet and 0-step rows")
    p.add_argument('--lamb', type=float, nargs=2, default=[1.0, 1.0], metavar=('LO', 'HI'),
                   help="speed: lamb log-uniform in [LO, HI] per (head, channel); 1 1 (the default) is all ones. "
                        "0.25 5 spreads it as a trained layer may, where cg_precond='jacobi' pays")
    args = p.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, B={args.B} T={args.T} H={args.H} bf16")
    for D in args.dims:
        print(f"\n## D = {D}")
        if 'speed' in args.parts:
            speed(D, args)
        if 'accuracy' in args.parts:
            print(f"\n| accuracy, B=1 T={args.T} H=4 | rel. error of o vs float64 exact | steps (mean) |\n|---|---|---|")
            for name, e, s in accuracy(D, T=args.T):
                print(f"| {name} | {e:.2e} | {'' if s is None else f'{s:.1f}'} |")
        if 'gradients' in args.parts:
            names, rows = grad_accuracy(D, T=args.T)
            print(f"\n| gradient accuracy, B=1 T={args.T} H=4, rel. error vs float64 exact | "
                  + " | ".join('d' + n for n in names) + " |\n" + "|---" * (len(names) + 1) + "|")
            for name, es in rows:
                print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in es) + " |")
        if 'decode' in args.parts:
            print(f"\n| decoding, H={args.H}, 30 CG at most | fla tokens/s | ours tokens/s | ratio "
                  "| fla, CUDA graph | ours, CUDA graph | ratio | our mean CG iterations |\n|---|---|---|---|---|---|---|---|")
            for B, fla, ours, fla_g, ours_g, iters in decode(D, H=args.H):
                print(f"| batch {B} | {fla:,.0f} | {ours:,.0f} | {ours / fla:.2f} | {fla_g:,.0f} | {ours_g:,.0f} "
                      f"| {ours_g / fla_g:.2f} | {iters:.1f} |")


if __name__ == '__main__':
    main()
