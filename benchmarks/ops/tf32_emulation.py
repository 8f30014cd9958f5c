"""CPU emulation of the GPU's products in `chunk_mesa` on fp32 inputs: what tf32's rounding does to outputs and gradients.

    python benchmarks/ops/tf32_emulation.py [--cases T65K32forget T200K64mid T1K64mid]

On an H100, Triton's tf32 products truncate each float32 operand to 10 stored mantissa bits (round toward zero):
float16 values pass through them exactly, and on positive operands their error is 15x float16's, whose rounding is
to nearest (benchmarks/ops/fp16_products/dotprec.py, RESULTS eighteenth session). This script runs `chunk_mesa`'s
PyTorch path, which is the CUDA path's composition (the forward's states and CG, and a backward of GLA passes plus
the adjoint CG solve), with every operand of every `torch.einsum` product rounded, forward and backward alike:
- 'rz': truncated to tf32, the GPU's products;
- 'rn': rounded to nearest at tf32's width, float16's significand (the CG kernel's scaled float16 products, which
  it takes for half-precision inputs only: `fla_mesa.ops.cg.products_dtype`).

The products are rounded everywhere, or everywhere except in the CG solves. The script prints the relative errors
of the output and of every gradient against the float64 exact solve, on the inputs of the GPU test cases of
tests/ops/test_chunk_gpu.py (same seeds and cotangents), for the Jacobi and the zero start. Elementwise products
stay float32, as on the GPU.
"""

import argparse
import os
import sys

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests', 'ops')]

import fla_mesa.ops.chunk as chunk_module  # noqa: E402
from fla_mesa.ops import chunk_mesa, naive_recurrent_mesa  # noqa: E402
from mesa_inputs import make_inputs, rel  # noqa: E402
from test_chunk_gpu import grad_errors, grads_of  # noqa: E402  (the GPU test's gradient harness)

CASES = {
    'T65K32forget': dict(B=2, T=65, H=2, K=32, V=48, gate='forget', lamb_range=(0.01, 10.0), initial_state=True),
    'T200K64mid': dict(B=2, T=200, H=2, K=64, V=64, gate='mid', lamb_range=(0.25, 2.0), initial_state=True),
    'T1K64mid': dict(B=1, T=1, H=2, K=64, V=64, gate='mid', lamb_range=(0.5, 2.0), initial_state=True),
}
# (label, rounding outside the CG solves, rounding inside them)
PRODUCTS = [('float32', None, None), ('tf32 (rz) everywhere: the GPU', 'rz', 'rz'),
            ('tf32 (rz), rn in CG: float16 CG products', 'rz', 'rn'), ('rn everywhere', 'rn', 'rn')]
NAMES = ['q', 'k', 'v', 'g', 'beta', 'lamb', 'h_kk0', 'h_kv0']
MODE = {'now': None, 'cg': None}
_einsum = torch.einsum
_cg_solve = chunk_module.torch_chunk_cg_solve


def tf32(x, mode='rz'):
    """x's float32 values kept to tf32's 10 stored mantissa bits: truncated ('rz') or rounded to nearest ('rn')."""
    if mode is None or x.dtype != torch.float32:
        return x
    bits = x.detach().contiguous().view(torch.int32)
    return ((bits + (0x1000 if mode == 'rn' else 0)) & ~0x1FFF).view(torch.float32)


class RoundedEinsum(torch.autograd.Function):
    """einsum of rounded operands; its backward's products take rounded operands too (the incoming gradient and
    the other operands), as the GPU's backward kernels do."""

    @staticmethod
    def forward(ctx, eq, mode, *operands):
        ctx.save_for_backward(*operands)
        ctx.eq, ctx.mode = eq, mode
        return _einsum(eq, *[tf32(o, mode) for o in operands])

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            ops = [tf32(o, ctx.mode).detach().requires_grad_(o.requires_grad) for o in ctx.saved_tensors]
            need = [o for o in ops if o.requires_grad]
            got = iter(torch.autograd.grad(_einsum(ctx.eq, *ops), need, tf32(grad, ctx.mode)) if need else ())
        return (None, None, *[next(got) if o.requires_grad else None for o in ops])


def einsum(eq, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    return _einsum(eq, *operands) if MODE['now'] is None else RoundedEinsum.apply(eq, MODE['now'], *operands)


def cg_solve(*args, **kwargs):
    saved, MODE['now'] = MODE['now'], MODE['cg']
    try:
        return _cg_solve(*args, **kwargs)
    finally:
        MODE['now'] = saved


def reference(case):
    """The GPU test `case`'s inputs (seed 1), cotangents (seed 2), and float64 exact output and gradients."""
    inputs = make_inputs(**case, seed=1)
    gen = torch.Generator().manual_seed(2)
    B, T, H, K, V = (case[n] for n in 'BTHKV')
    cot = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((B, T, H, V), (B, H, K, K), (B, H, K, V))]
    o_ref, _, g_ref = grads_of(naive_recurrent_mesa, *inputs, cot)
    return inputs, cot, o_ref, g_ref


def errors(ref, rest, cg, cg_init):
    """Relative errors of o and every gradient against `reference`'s, on its fp32 inputs, with the products outside
    and inside the CG solves rounded as `rest` and `cg`."""
    inputs, cot, o_ref, g_ref = ref
    f32 = [tuple(x.float() for x in t) if isinstance(t, tuple) else t.float() for t in inputs]
    MODE['now'], MODE['cg'] = rest, cg
    try:
        o, _, grads = grads_of(chunk_mesa, *f32, cot, cg_steps=3 * inputs[0].shape[-1], cg_init=cg_init)
    finally:
        MODE['now'] = None
    return {'o': rel(o, o_ref), **grad_errors(grads, g_ref)}


def main(argv=None):
    """Prints the tables; returns {(case, products label, start): errors}."""
    p = argparse.ArgumentParser()
    p.add_argument('--cases', nargs='+', choices=list(CASES), default=list(CASES))
    args = p.parse_args(argv)
    torch.einsum, chunk_module.torch_chunk_cg_solve = einsum, cg_solve
    rows = {}
    try:
        for name in args.cases:
            ref = reference(CASES[name])
            print(f"\n{name}: {CASES[name]}, cg_steps {3 * CASES[name]['K']}; relative errors against float64")
            print("| products | start | " + ' | '.join(['o'] + ['d' + n for n in NAMES]) + " | largest |")
            print("|---|---|" + "---|" * (2 + len(NAMES)))
            for label, rest, cg in PRODUCTS:
                for init in ('jacobi', 'zero'):
                    errs = rows[name, label, init] = errors(ref, rest, cg, init)
                    print(f"| {label} | {init} | " + ' | '.join(f'{e:.1e}' for e in errs.values())
                          + f" | {max(errs.values()):.1e} |", flush=True)
    finally:
        torch.einsum, chunk_module.torch_chunk_cg_solve = _einsum, _cg_solve
    return rows


if __name__ == '__main__':
    main()
