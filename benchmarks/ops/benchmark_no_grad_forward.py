"""`chunk_mesa`'s forward as training calls it (inputs requiring grad: x is written for the backward) and under
`torch.no_grad()` (inference and prefill: the CG kernel does not write x), side by side in one process.

    python benchmarks/ops/benchmark_no_grad_forward.py      (GPU; B=8 T=2048 H=16 bf16, 30 CG steps, lamb = 1)

Each variant is timed twice, interleaved (`triton.testing.do_bench` medians, ms).
"""

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from fla_mesa.ops import chunk_mesa


def main(B=8, T=2048, H=16):
    print("| head dim | forward, grad mode (ms, two runs) | forward, no_grad (ms, two runs) |")
    print("|---|---|---|")
    for D in (64, 128):
        q, k = (F.normalize(torch.randn(B, T, H, D, device='cuda'), dim=-1).bfloat16().requires_grad_()
                for _ in range(2))
        v = torch.randn(B, T, H, D, device='cuda').bfloat16().requires_grad_()
        g = F.logsigmoid(torch.randn(B, T, H, device='cuda') + 4).requires_grad_()
        beta = torch.rand(B, T, H, device='cuda').requires_grad_()
        lamb = torch.ones(H, D, device='cuda').requires_grad_()

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
