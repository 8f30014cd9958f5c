"""Where the peak memory of `chunk_mesa`'s forward+backward is: the memory live before, and the peak during, each
step of the CUDA forward and backward (the state kernel, the CG solve, fla's state gradients, our GLA gradient
kernels or, at K = V <= 64 with scaled states, our paired state-gradient scan and `mesa_backward`'s kernels, the
elementwise kernels; `bwd_prep`, `_gla_bwd` and `bwd_combine` run only with `fp32_backward=False`), in GiB over the
inputs; and fla's `chunk_mesa_net` forward peak for comparison.

Usage: python benchmarks/ops/memory_mesa.py      (GPU; B=8 T=2048 H=16, bf16, 30 CG steps, D = 128 and 64)
"""

import os
import sys

import torch

import fla_mesa.ops.chunk as mesa_chunk
from fla_mesa.ops import chunk_mesa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_mesa import inputs  # noqa: E402

B, T, H = 8, 2048, 16
STEPS = ('chunk_states_fwd', 'chunk_state_pair_fwd', 'chunk_cg_solve', '_state_grads', 'chunk_state_grads_pair_bwd',
         'chunk_gla_bwd', 'bwd_solve', 'bwd_prep', '_gla_bwd', 'bwd_combine', 'mesa_bwd_dk', 'mesa_bwd_dw')


def record(module, name, log):
    """Wraps `module.name` so that each call appends (name, GiB live before it, peak GiB during it)."""
    fn = getattr(module, name)

    def wrapped(*args, **kwargs):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        log.append((name, before / 2 ** 30, torch.cuda.max_memory_allocated() / 2 ** 30))
        return out
    setattr(module, name, wrapped)


def main():
    from fla.ops.mesa_net import chunk_mesa_net
    log = []
    for name in STEPS:
        record(mesa_chunk, name, log)
    for D in (128, 64):
        for label, fn in [('chunk_mesa', lambda *a: chunk_mesa(*a, cg_steps=30)[0]),
                          ('fla chunk_mesa_net', lambda *a: chunk_mesa_net(*a, max_CG_iteration=30)[0])]:
            args = inputs(B, T, H, D, True)
            for _ in range(2):  # the second pass, with the gradients of the first already allocated
                log.clear()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                o = fn(*args)
                torch.cuda.synchronize()
                fwd_peak = torch.cuda.max_memory_allocated()  # ours: since its CG solve, which holds both states
                o.backward(torch.ones_like(o))
                torch.cuda.synchronize()
            print(f"== D={D} {label}: forward peak {(fwd_peak - base) / 2 ** 30:.3f} GiB over the inputs")
            for name, before, peak in log:
                gib = base / 2 ** 30
                print(f"   {name:22s} live before {before - gib:.3f}  peak during {peak - gib:.3f}")
            del o, args


if __name__ == '__main__':
    main()
