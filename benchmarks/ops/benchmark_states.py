"""Times the chunk-state kernel (`fla_mesa/ops/states.py`) over its launch configurations: first float32 states of
beta * k * k^T against fla's `chunk_fwd_h` on float32 copies of k and beta * k (what `chunk_mesa`'s forward did
before the kernel); then as `chunk_mesa` runs it, the forward's state pair (H's and S's states from one launch) and
the backward's single states, stored as `chunk_mesa` stores them (float16 with column scales at D = 64); last the
D = 64 backward's state-gradient scans (`chunk_state_grads_kernel`): S's (output gradient do, bf16) and H's (u,
float32) from two launches against the pair from one, over the pair's launch configurations.

Usage: python benchmarks/ops/benchmark_states.py [PART ...]     (GPU; B=8 T=2048 H=16, bf16 k, D = 128 and 64;
    PART: against_fla, as_stored, state_grads; all three by default)
"""

import itertools
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import fla_mesa.ops.states as states
from fla_mesa.ops.states import chunk_states_kernel, states_launch_config

B, T, H = 8, 2048, 16


def against_fla():
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


def stored_outputs(k, pair, scaled):
    """Chunk-start states for `launch_stored` as `chunk_mesa` stores them: per state [values, column scales, None]."""
    B, T, H, D = k.shape
    return [[k.new_empty(B, T // 64, H, D, D, dtype=torch.float16 if scaled else torch.float32),
             k.new_empty(B, T // 64, H, D, dtype=torch.float32) if scaled else None, None] for _ in range(1 + pair)]


def launch_stored(k, v, beta, gc, outs, pair, scaled, BK, BV, w, s):
    """The forward's pair (values k and v) or the single state (values k) into `outs` (`stored_outputs`)."""
    B, T, H, D = k.shape
    second = (v, None, *outs[1]) if pair else (None,) * 5
    chunk_states_kernel[(triton.cdiv(D, BK), triton.cdiv(D, BV) * (1 + pair), B * H)](
        k, k, beta, gc, None, *outs[0], *second, None, None, T=T, H=H, K=D, V=D, BT=64, BK=BK, BV=BV,
        USE_INITIAL_STATE=False, STORE_FINAL_STATE=False, SCALED=scaled, PAIR=pair, IS_VARLEN=False, num_warps=w,
        num_stages=s)


def as_stored(dims=(128, 64)):
    """The pair and the single state, in chunk_mesa's storage, every configuration against the shipped one's states
    (the differences must be 0: the tiles change no arithmetic)."""
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    from fla_mesa.ops.chunk import scaled_states
    for D in dims:
        k = F.normalize(torch.randn(B, T, H, D, device='cuda'), dim=-1).bfloat16()
        v = torch.randn(B, T, H, D, device='cuda').bfloat16()
        beta = torch.rand(B, T, H, device='cuda')
        gc = chunk_local_cumsum(F.logsigmoid(torch.randn(B, T, H, device='cuda') + 4), chunk_size=64, scale=RCP_LN2)
        scaled = scaled_states(k)
        for pair in (True, False):
            outs = stored_outputs(k, pair, scaled)
            cfg = states_launch_config(D, D, pair)
            ship = (cfg['BK'], cfg['BV'], cfg['num_warps'], cfg['num_stages'])
            launch_stored(k, v, beta, gc, outs, pair, scaled, *ship)
            ref = [o[0].clone() for o in outs]
            res = []
            for c in itertools.product((D,) if scaled else (32, 64), (16, 32, 64), (1, 2, 4), (2, 3)):
                if c[1] > D:
                    continue
                launch_stored(k, v, beta, gc, outs, pair, scaled, *c)
                diff = max((o[0].float() - r.float()).abs().max().item() for o, r in zip(outs, ref))
                res.append((do_bench(lambda: launch_stored(k, v, beta, gc, outs, pair, scaled, *c), warmup=10, rep=50),
                            c, diff))
            res.sort()
            name = 'pair' if pair else 'single'
            for t, c, diff in res[:4]:
                print(f"D={D} {name} BK={c[0]} BV={c[1]} warps={c[2]} stages={c[3]}: {t:.4f} ms (max diff {diff:.0e})")
            print(f"D={D} {name} as shipped {ship}: {[t for t, c, _ in res if c == ship][0]:.4f} ms", flush=True)


def state_grads(D=64):
    """The backward's two state-gradient scans (query x float32, output gradients do bf16 and u float32) from two
    launches as shipped, against the pair from one launch in each configuration, whose states must equal the two
    launches' bit for bit (each program runs the same arithmetic)."""
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2
    x, u = (torch.randn(B, T, H, D, device='cuda') for _ in range(2))
    do = torch.randn(B, T, H, D, device='cuda').bfloat16()
    gc = chunk_local_cumsum(F.logsigmoid(torch.randn(B, T, H, device='cuda') + 4), chunk_size=64, scale=RCP_LN2)

    def two():
        return states.chunk_state_grads_bwd(x, do, gc), states.chunk_state_grads_bwd(x, u, gc)

    ref = two()
    t_two = min(do_bench(two, warmup=50, rep=300) for _ in range(3))
    print(f"D={D} state gradients, two launches as shipped: {t_two * 1e3:.1f} us", flush=True)
    shipped = states.state_grads_launch_config
    res = []
    try:
        for BV, w, st in itertools.product((16, 32, 64), (1, 2, 4), (1, 2, 3)):
            states.state_grads_launch_config = lambda V, pair=False: dict(BV=BV, num_warps=w, num_stages=st)
            out = states.chunk_state_grads_pair_bwd(x, do, u, gc)
            same = all(torch.equal(a.values, b.values) and torch.equal(a.scales, b.scales)
                       for (a, _), (b, _) in zip(ref, out))
            t = min(do_bench(lambda: states.chunk_state_grads_pair_bwd(x, do, u, gc), warmup=50, rep=300)
                    for _ in range(3))
            res.append((t, (BV, w, st), same))
    finally:
        states.state_grads_launch_config = shipped
    res.sort()
    for t, (BV, w, st), same in res[:6]:
        print(f"D={D} pair BV={BV} warps={w} stages={st}: {t * 1e3:.1f} us ({t / t_two:.3f} of two launches), "
              f"equal to them bit for bit: {same}")
    cfg = shipped(D, pair=True)
    ship = (cfg['BV'], cfg['num_warps'], cfg['num_stages'])
    print(f"D={D} pair as shipped {ship}: {[t for t, c, _ in res if c == ship][0] * 1e3:.1f} us", flush=True)


def main(parts):
    for part in parts:
        dict(against_fla=against_fla, as_stored=as_stored, state_grads=state_grads)[part]()


if __name__ == '__main__':
    main(sys.argv[1:] or ['against_fla', 'as_stored', 'state_grads'])
