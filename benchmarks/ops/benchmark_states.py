"""Times the float32 chunk-state kernel (`fla_mesa/ops/states.py`) against fla's `chunk_fwd_h` on float32 copies of
k and beta * k (what `chunk_mesa`'s forward did before the kernel), over the kernel's launch configurations.

Usage: python benchmarks/ops/benchmark_states.py      (GPU; B=8 T=2048 H=16, bf16 k, D = 128 and 64)
"""

import itertools

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from fla_mesa.ops.states import chunk_states_kernel, states_launch_config

B, T, H = 8, 2048, 16


def main():
    from fla.ops.common.chunk_h import chunk_fwd_h
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2
    for D in (128, 64):
        k = F.normalize(torch.randn(B, T, H, D, device='cuda'), dim=-1).bfloat16()
        beta = torch.rand(B, T, H, device='cuda')
        g = F.logsigmoid(torch.randn(B, T, H, device='cuda') + 4)
        gc = chunk_local_cumsum(g, chunk_size=64, scale=RCP_LN2)

        def fla_states():
            kf = k.float()
            return chunk_fwd_h(k=kf, v=kf * beta[..., None], g=gc, h0=None, output_final_state=False, chunk_size=64,
                               states_in_fp32=True)[0]

        ref = fla_states()
        print(f"D={D} fla chunk_fwd_h on float32 k, beta * k (casts included): "
              f"{do_bench(fla_states, warmup=20, rep=100):.3f} ms", flush=True)
        h = torch.empty_like(ref)
        res = []
        for BK, BV, w, s in itertools.product((32, 64), (32, 64, 128), (2, 4, 8), (1, 2, 3)):
            if BK > D or BV > D:
                continue

            def ours():
                chunk_states_kernel[(triton.cdiv(D, BK), triton.cdiv(D, BV), B * H)](
                    k, k, beta, gc, None, h, None, None, *(None,) * 5, None, None, T=T, H=H, K=D, V=D, BT=64, BK=BK,
                    BV=BV, USE_INITIAL_STATE=False, STORE_FINAL_STATE=False, SCALED=False, PAIR=False,
                    IS_VARLEN=False, num_warps=w, num_stages=s)

            ours()
            err = ((h - ref).norm() / ref.norm()).item()
            res.append((do_bench(ours, warmup=10, rep=50), (BK, BV, w, s), err))
        res.sort()
        for t, cfg, err in res[:6]:
            print(f"D={D} ours BK={cfg[0]} BV={cfg[1]} warps={cfg[2]} stages={cfg[3]}: {t:.3f} ms (rel. diff {err:.1e})")
        cfg = states_launch_config(D, D)
        ship = (cfg['BK'], cfg['BV'], cfg['num_warps'], cfg['num_stages'])
        shipped = [t for t, c, _ in res if c == ship]
        print(f"D={D} ours as shipped {ship}: {shipped[0]:.3f} ms", flush=True)


if __name__ == '__main__':
    main()
