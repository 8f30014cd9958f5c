"""CPU emulation: what half-precision chunk states and a half-precision saved x would cost `chunk_mesa` in accuracy.

    python benchmarks/ops/half_states_emulation.py [--T 512 --H 2 --dims 64 128]

At head dim 64 the passes around CG decide the op's speed, and ours keep the chunk states (H's and S's, and their
gradients in the backward) and the solution x saved for the backward in float32, where fla's MesaNet keeps bf16:
twice the bytes (benchmarks/RESULTS.md, nineteenth session). This script measures, before any kernel is written,
what storing them in half precision would do to the output and every gradient. It runs `chunk_mesa`'s PyTorch path
(the CUDA path's composition: the forward's states and CG, the backward's GLA passes through the states and the
adjoint CG solve) with every product's operands rounded to float16's significand (the CG kernel's float16
products, `tf32_emulation.py`'s 'rn'), and rounds, on top of that:
- the chunk-start states where they are formed and their gradients where autograd carries them back (`states`);
- x as the forward saves it for the backward (`x`; the forward's own output uses x unrounded, as the CUDA kernel
  does: it keeps x on chip);
each to bf16 (fla's choice), or to float16 scaled by one power of two per state column (per value channel) and per
token of x ('fp16 scaled', the scaling the output pass took for its operands in a90c8a6).

The inputs are bf16 values held as float32 (so that the op's output and gradients are not rounded to bf16 on the
way out): normalised q and k, gamma mostly in (0.95, 1), lamb = 1, as `benchmark_mesa.py`'s accuracy part. The
relative errors are against the float64 exact solve on the same values; the last table adds, in quadrature, the
bf16 rounding of each exact tensor (what a bf16 output or gradient carries anyway), to read each change against it.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tf32_emulation as emu  # noqa: E402  (puts the repository and tests/ops on sys.path)

import fla_mesa.ops.chunk as chunk_module  # noqa: E402
from fla_mesa.ops import chunk_mesa, naive_recurrent_mesa  # noqa: E402
from fla_mesa.ops.scaled_states import ScaledStates  # noqa: E402
from mesa_inputs import rel  # noqa: E402
from test_chunk_gpu import grad_errors, grads_of  # noqa: E402

ROUND = {'states': None, 'x': None}
_chunk_states, _torch_fwd = chunk_module.chunk_states, chunk_module._torch_fwd


def to_half(t, mode, dim):
    """`t` (float32) rounded as stored in half precision: 'bf16', or 'fp16' with one power of two per slice along
    `dim` (the reduction runs over `dim`: the largest magnitude of each slice sets its scale), as `ScaledStates`
    stores the states with `dim` as their K axis."""
    if mode is None:
        return t
    if mode == 'bf16':
        return t.bfloat16().float()
    return ScaledStates.of(t.transpose(dim, -2)).float().transpose(dim, -2)


class Rounded(torch.autograd.Function):
    """Rounds the forward value and the gradient that comes back (a state and its gradient, both stored)."""

    @staticmethod
    def forward(ctx, t, mode, dim):
        ctx.mode, ctx.dim = mode, dim
        return to_half(t, mode, dim)

    @staticmethod
    def backward(ctx, grad):
        return to_half(grad, ctx.mode, ctx.dim), None, None


def rounded_states(k, v, gc, h0, chunk_size):
    h, ht = _chunk_states(k, v, gc, h0, chunk_size)
    # states [B, NT, H, K, V]: one scale per value column of each chunk's state, the max taken over K
    return (h if ROUND['states'] is None else Rounded.apply(h, ROUND['states'], -2)), ht


def fwd_saving_rounded_x(*args):
    o, ht_kk, ht_kv, x, iters = _torch_fwd(*args)
    return o, ht_kk, ht_kv, to_half(x, ROUND['x'], -1), iters


def inputs(B, T, H, D, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1).bfloat16()
    k = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, generator=gen).bfloat16()
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 4.0).bfloat16()
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen)).bfloat16()
    lamb = torch.ones(H, D)
    state = tuple(torch.zeros(B, H, D, D) for _ in range(2))
    return [t.double() for t in (q, k, v, g, beta, lamb)] + [tuple(s.double() for s in state)]


X_LABELS = {None: 'float32', 'bf16': 'bf16', 'fp16': 'fp16 scaled'}
VARIANTS = [('float32 (as now)', None, None), ('bf16', 'bf16', None), ('fp16 scaled', 'fp16', None),
            ('float32', None, 'bf16'), ('float32', None, 'fp16'), ('bf16', 'bf16', 'bf16'),
            ('fp16 scaled', 'fp16', 'fp16')]


def main(argv=None):
    """Prints the tables; returns {(D, states, x): errors}."""
    p = argparse.ArgumentParser()
    p.add_argument('--B', type=int, default=1)
    p.add_argument('--T', type=int, default=512)
    p.add_argument('--H', type=int, default=2)
    p.add_argument('--dims', type=int, nargs='+', default=[64, 128])
    args = p.parse_args(argv)
    rows = {}
    patched = dict(chunk_states=rounded_states, _torch_fwd=fwd_saving_rounded_x)
    saved = {n: getattr(chunk_module, n) for n in patched}
    torch.einsum = emu.einsum
    emu.MODE['now'] = 'rn'
    for n, f in patched.items():
        setattr(chunk_module, n, f)
    try:
        for D in args.dims:
            *ins, st = inputs(args.B, args.T, args.H, D)
            gen = torch.Generator().manual_seed(2)
            cot = [torch.randn(s, generator=gen, dtype=torch.float64)
                   for s in ((args.B, args.T, args.H, D), (args.B, args.H, D, D), (args.B, args.H, D, D))]
            o_ref, _, g_ref = grads_of(naive_recurrent_mesa, *ins, st, cot)
            f32 = [t.float() for t in ins]
            floor = {'o': rel(o_ref.bfloat16(), o_ref)}
            floor.update({f'd{n}': rel(gr.bfloat16(), gr) for n, gr in zip(emu.NAMES, g_ref)})
            print(f"\nD={D} B={args.B} T={args.T} H={args.H}: relative errors against float64 (products rounded to "
                  f"float16's significand; 30 CG steps, Jacobi start)")
            print("| states | saved x | " + ' | '.join(['o'] + ['d' + n for n in emu.NAMES]) + " |")
            print("|---|---|" + "---|" * (1 + len(emu.NAMES)))
            for label, rs, rx in VARIANTS:
                ROUND['states'], ROUND['x'] = rs, rx
                o, _, grads = grads_of(chunk_mesa, *f32, tuple(s.float() for s in st), cot, cg_steps=30)
                errs = rows[D, rs, rx] = {'o': rel(o, o_ref), **grad_errors(grads, g_ref)}
                print(f"| {label} | {X_LABELS[rx]} | " + ' | '.join(f'{e:.2e}' for e in errs.values()) + " |",
                      flush=True)
            print("\nWith each exact tensor's bf16 rounding added in quadrature (what bf16 outputs carry anyway):")
            print("| states | saved x | " + ' | '.join(floor) + " |")
            print("|---|---|" + "---|" * len(floor))
            print("| (bf16 rounding alone) | | " + ' | '.join(f'{e:.2e}' for e in floor.values()) + " |")
            for label, rs, rx in VARIANTS:
                errs = rows[D, rs, rx]
                print(f"| {label} | {X_LABELS[rx]} | "
                      + ' | '.join(f'{(errs[n] ** 2 + floor[n] ** 2) ** 0.5:.2e}' for n in floor) + " |")
    finally:
        torch.einsum, emu.MODE['now'] = emu._einsum, None
        for n, f in saved.items():
            setattr(chunk_module, n, f)
        ROUND['states'] = ROUND['x'] = None
    return rows


if __name__ == '__main__':
    main()
