"""`chunk_mesa`'s forward as training calls it (inputs requiring grad: x is written for the backward) and under
`torch.no_grad()` (inference and prefill: the CG kernel does not write x), side by side in one process.

    python benchmarks/ops/benchmark_no_grad_forward.py      (GPU; B=8 T=2048 H=16 bf16, 30 CG steps, lamb = 1)

Each variant is timed twice, interleaved (`triton.testing.do_bench` medians, ms).
"""

import torch
from profile_mesa import random_inputs
from triton.testing import do_bench

from fla_mesa.ops import chunk_mesa


def main(B=8, T=2048, H=16):
    print("| head dim | forward, grad mode (ms, two runs) | forward, no_grad (ms, two runs) |")
    print("|---|---|---|")
    for D in (64, 128):
        q, k, v, g, beta, lamb = random_inputs(B, T, H, D, 1.0)

        def train():
            chunk_mesa(q, k, v, g, beta, lamb, check_values=False)

        def infer():
            with torch.no_grad():
                train()
        for _ in range(3):
            train()
            infer()
        a, b, a2, b2 = (do_bench(fn, warmup=25, rep=200) for fn in (train, infer, train, infer))
        print(f"| {D} | {a:.3f} {a2:.3f} | {b:.3f} {b2:.3f} |", flush=True)


if __name__ == '__main__':
    main()
