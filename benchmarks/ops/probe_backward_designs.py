"""Two designs for the D=64 backward, probed without building them (one GPU, CUDA graphs, `graph_bench`).

Usage: python benchmarks/ops/probe_backward_designs.py [--B 8 --T 2048 --H 16 --dims 128 64]
                                                       [--parts sequential registers]
- `sequential`: one program per sequence and head walking its chunks in order (the state gradient kept on chip, no
  separate `chunk_bwd_dh`), as fla's `fused_chunk_simple_gla` does, against fla's chunked `chunk_simple_gla`:
  forward and forward+backward, and the backward kernels alone (chunked: `chunk_bwd_dh`, `chunk_bwd_dqkwg` and
  `chunk_bwd_dv`; sequential: `fused_chunk_bwd`, which also recomputes the forward states).
- `registers`: a cap on registers per thread (Triton's `maxnreg`: more programs per SM, more spills) for our CG
  kernel, timed as `chunk_mesa`'s forward (30 CG and `cg_tol=0.01`, beside fla's `chunk_mesa_net`), and for the
  backward's GLA gradient kernels, both sides as the backward calls them (`benchmark_gla_bwd.py`'s inputs).
Prints one table per part, last.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_gla_bwd import inputs as gla_inputs  # noqa: E402
from benchmark_mesa import call, graph_bench, inputs, shape_parser  # noqa: E402

from fla_mesa.ops import cg, chunk_mesa, gla_backward  # noqa: E402
from fla_mesa.ops.scaled_states import ScaledStates  # noqa: E402

CAPS = (None, 192, 168, 128)


def sequential(B, T, H, D):
    from fla.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv
    from fla.ops.common.fused_chunk import fused_chunk_bwd
    from fla.ops.simple_gla import chunk_simple_gla
    from fla.ops.simple_gla.fused_chunk import fused_chunk_simple_gla
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    q, k, v, g = inputs(B, T, H, D, True)[:4]
    rows = []
    for name, fn in (('chunk_simple_gla', chunk_simple_gla), ('fused_chunk_simple_gla', fused_chunk_simple_gla)):
        op = (lambda q, k, v, g, fn=fn: fn(q, k, v, g, scale=1.0)[0])
        rows.append((f"D={D} {name}: fwd, fwd+bwd", graph_bench(call(op, (q, k, v, g), False)),
                     graph_bench(call(op, (q, k, v, g), True))))
    with torch.no_grad():
        q, k, v = (t.detach() for t in (q, k, v))
        do = torch.randn_like(v)
        gc = chunk_local_cumsum(g.detach(), chunk_size=64, scale=RCP_LN2)
        h, _ = chunk_fwd_h(k=k, v=v, g=gc, states_in_fp32=True)

        def chunked():
            dh, _ = chunk_bwd_dh(q=q, k=k, v=v, do=do, h0=None, dht=None, scale=1.0, g=gc, chunk_size=64)
            chunk_bwd_dqkwg(q=q, k=k, v=v, do=do, h=h, dh=dh, g=gc, scale=1.0, chunk_size=64)
            chunk_bwd_dv(q=q, k=k, do=do, dh=dh, g=gc, scale=1.0, chunk_size=64)

        def fused():
            fused_chunk_bwd(q, k, v, gc, None, do, 1.0, None, None)
        rows.append((f"D={D} backward kernels: chunked, sequential", graph_bench(chunked), graph_bench(fused)))
    return rows


def with_cap(configs: dict, cap):
    return configs if cap is None else dict(configs, maxnreg=cap)


def registers(B, T, H, D):
    from fla.ops.mesa_net import chunk_mesa_net

    args = inputs(B, T, H, D, True)
    fla = graph_bench(call(lambda *a: chunk_mesa_net(*a, max_CG_iteration=30)[0], args, False))
    rows = [(f"D={D} fla chunk_mesa_net forward, 30 CG", fla, None, None)]
    ship_cg, ship_gla = cg.cg_launch_config, gla_backward.launch_configs
    try:
        for cap in CAPS:
            cg.cg_launch_config = (lambda K, chunk_size=64, cap=cap: with_cap(ship_cg(K, chunk_size), cap))
            fwd = [graph_bench(call(lambda *a, kw=kw: chunk_mesa(*a, check_values=False, **kw)[0], args, False))
                   for kw in (dict(cg_steps=30), dict(cg_steps=30, cg_tol=1e-2))]
            rows.append((f"D={D} chunk_mesa forward, CG kernel maxnreg={cap}: 30 CG, cg_tol=0.01 (/ fla)",
                         *fwd, fwd[1] / fla))
        d = gla_inputs(B, T, H, D)
        x, k, v, beta, do, u, gc, h_kv, dh = (d[n] for n in ('x', 'k', 'v', 'beta', 'do', 'u', 'gc', 'h', 'dh'))
        h_kk = ScaledStates.of(torch.randn_like(dh)) if isinstance(h_kv, ScaledStates) else torch.randn_like(dh)

        def both_sides():
            dq, dv, dk, dg, dbeta = gla_backward.chunk_gla_bwd(x, k, v, beta, do, h_kv, dh, gc)
            gla_backward.chunk_gla_bwd(x, k, k, beta, u, h_kk, dh, gc, acc=(dk, dk, dg, dbeta), negate=True,
                                       with_dq=False)
        for cap in CAPS:
            gla_backward.launch_configs = (lambda K, V, cap=cap: tuple(with_cap(c, cap) for c in ship_gla(K, V)))
            rows.append((f"D={D} GLA gradient kernels, both sides, maxnreg={cap}", graph_bench(both_sides), None,
                         None))
    finally:
        cg.cg_launch_config, gla_backward.launch_configs = ship_cg, ship_gla
    return rows


def main():
    p = shape_parser()
    p.add_argument('--parts', nargs='+', choices=('sequential', 'registers'), default=['sequential', 'registers'])
    args = p.parse_args()
    import triton
    import fla
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, "
          f"fla {fla.__version__}, B={args.B} T={args.T} H={args.H}, bf16 inputs")
    tables = {}
    for part in args.parts:
        for D in args.dims:
            for row in (sequential if part == 'sequential' else registers)(args.B, args.T, args.H, D):
                print(row, flush=True)
                tables.setdefault(part, []).append(row)
    for part, rows in tables.items():
        print(f"\n## {part} (ms of GPU time)\n| what | a | b | c |\n|---|---|---|---|")
        for name, *vals in rows:
            vals += [None] * (3 - len(vals))
            print(f"| {name} | " + " | ".join('' if t is None else f'{t:.4f}' for t in vals) + " |")


if __name__ == '__main__':
    main()
