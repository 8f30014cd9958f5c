"""Where the GPU time of `chunk_mesa`'s forward+backward goes: `torch.profiler`'s kernel totals per pass.

Usage: python benchmarks/ops/profile_mesa.py          (GPU; B=8 T=2048 H=16, bf16, lamb = 0.25, forget gates near 1;
D = 128 and 64, 30 and 0 CG steps)
"""

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from fla_mesa.ops import chunk_mesa

B, T, H = 8, 2048, 16


def random_inputs(B, T, H, D, lamb):
    """bf16 normalised q and k and bf16 v, forget gates near 1, beta uniform in (0, 1), lamb the constant `lamb`: CUDA
    tensors requiring grad (unseeded; shared with `benchmark_no_grad_forward.py`)."""
    q, k = (F.normalize(torch.randn(B, T, H, D, device='cuda'), dim=-1).bfloat16() for _ in range(2))
    v = torch.randn(B, T, H, D, device='cuda').bfloat16()
    g = F.logsigmoid(torch.randn(B, T, H, device='cuda') + 4)
    beta = torch.rand(B, T, H, device='cuda')
    return [t.requires_grad_() for t in (q, k, v, g, beta, torch.full((H, D), lamb, device='cuda'))]


def main():
    for D in (128, 64):
        q, k, v, g, beta, lamb = random_inputs(B, T, H, D, 0.25)
        for steps in (30, 0):
            def step():
                o, _ = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=steps)
                o.backward(torch.ones_like(o))
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            rows = sorted(((e.key, e.device_time_total / 5 / 1000, e.count // 5) for e in prof.key_averages()
                           if e.device_time_total > 0), key=lambda r: -r[1])
            print(f"== D={D} cg_steps={steps} fwd+bwd: total {sum(r[1] for r in rows):.2f} ms")
            for name, ms, n in rows[:12]:
                print(f"  {ms:7.3f} ms  x{n}  {name[:90]}")


if __name__ == '__main__':
    main()
