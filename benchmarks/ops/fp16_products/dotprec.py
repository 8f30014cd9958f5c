"""One 64 x 64 x 64 tl.dot against float64 (mean relative error over 50 draws): tf32, float16 and bf16 operands,
and float16 values multiplied as tf32; normal and uniform [0, 1) entries. Needs no change to the package.
Run from the repository root on a GPU (benchmarks/ops/fp16_products/README.md)."""
import torch, triton, triton.language as tl

@triton.jit
def k(a, b, c, MODE: tl.constexpr):
    o = tl.arange(0, 64)
    A = tl.load(a + o[:, None] * 64 + o[None, :])
    B = tl.load(b + o[:, None] * 64 + o[None, :])
    if MODE == 1:
        A = A.to(tl.float16); B = B.to(tl.float16)
    if MODE == 2:
        A = A.to(tl.bfloat16); B = B.to(tl.bfloat16)
    if MODE == 3:  # A rounded to fp16 in registers, multiplied as tf32
        A = A.to(tl.float16).to(tl.float32); B = B.to(tl.float16).to(tl.float32)
    C = tl.dot(A, B)
    tl.store(c + o[:, None] * 64 + o[None, :], C)

torch.manual_seed(0)
for dist in ('normal', 'uniform01'):
    errs = {m: [] for m in range(4)}
    for _ in range(50):
        A = torch.randn(64, 64, device='cuda') if dist == 'normal' else torch.rand(64, 64, device='cuda')
        B = torch.randn(64, 64, device='cuda') if dist == 'normal' else torch.rand(64, 64, device='cuda')
        ref = A.double() @ B.double()
        for m in range(4):
            C = torch.empty(64, 64, device='cuda')
            k[(1,)](A, B, C, MODE=m, num_warps=4)
            errs[m].append(((C.double() - ref).norm() / ref.norm()).item())
    print(dist, {['tf32', 'fp16', 'bf16', 'fp16-rounded as tf32'][m]: f"{sum(e)/len(e):.3e}" for m, e in errs.items()})
