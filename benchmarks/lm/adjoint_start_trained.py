"""Which start pays for the backward's solve in a trained model? Trains the demo's model (`demo.py`'s options and
preset), then runs forward+backward on validation windows and, for each layer's backward solve
(H_t + diag(lamb)) u_t = S_t do_t, reruns CG with the CUDA chunk kernel's stopping rule (a token stops at
||r_k|| <= 2^-16 ||r_0||) from x_0 = 0 (`chunk_mesa`'s choice without `cg_tol`) and from the Jacobi start, capped at
the model's CG steps and at 30. It prints the mean iterations a token takes from each start, and the error each
leaves against the float64 solve, relative to its norm over the layer's tokens. On the GPU the Jacobi start costs
about two and a half iterations of the head-dim-64 kernel (benchmarks/RESULTS.md, twenty-seventh session).

    python benchmarks/lm/adjoint_start_trained.py [demo.py options, e.g. --steps 200]
"""

import statistics
import sys

import common
import corpus
import demo


def main(argv=None) -> dict:
    from fla_mesa.ops import chunk
    from fla_mesa.ops.cg import TF32_FLOOR
    model, data, cfg, device = demo.trained_model(sys.argv[1:] if argv is None else argv)

    solve = chunk.torch_chunk_cg_solve
    caps = sorted({cfg['cg_steps'], 30})
    rows = []

    def measured(b, k, beta, gc, h_kk, lamb, cg_steps, cg_tol, cg_init, return_iters=False, chunk_size=64,
                 cg_precond='none'):
        # the backward's solves (`chunk._torch_bwd` is the caller) are measured, then run as asked
        if sys._getframe(1).f_code.co_name == '_torch_bwd':
            ref, _ = solve(*(t.double() for t in (b, k, beta, gc, h_kk, lamb)), 300, None, 'zero', False, chunk_size,
                           cg_precond)
            row = {}
            for cap in caps:
                for start in ('zero', 'jacobi'):
                    x, iters = solve(b, k, beta, gc, h_kk, lamb, cap, TF32_FLOOR, start, True, chunk_size, cg_precond)
                    row[cap, start] = (iters.double().mean().item(), ((x.double() - ref).norm() / ref.norm()).item())
            rows.append(row)
        return solve(b, k, beta, gc, h_kk, lamb, cg_steps, cg_tol, cg_init, return_iters, chunk_size, cg_precond)

    chunk.torch_chunk_cg_solve = measured
    try:
        windows = corpus.fixed_windows(data.val, 2 * cfg['batch_size'], cfg['seq_len'] + 1)
        for i in range(0, windows.shape[0], cfg['batch_size']):
            ids = windows[i:i + cfg['batch_size']].to(device)
            with common.autocast(device, True):
                loss = common.causal_lm_loss(model, ids)
            loss.backward()
    finally:
        chunk.torch_chunk_cg_solve = solve
    # the backward visits the layers last to first; rows[j] is layer n - 1 - j % n
    n = len(model.model.layers)
    out = {}
    print("\n| layer | CG at most | iterations from zero | from the Jacobi start | error from zero | from the Jacobi "
          "start |\n|---|---|---|---|---|---|")
    for layer in range(n):
        mine = [r for j, r in enumerate(rows) if n - 1 - j % n == layer]
        for cap in caps:
            z, j = (tuple(statistics.mean(r[cap, s][i] for r in mine) for i in range(2)) for s in ('zero', 'jacobi'))
            out[layer, cap] = {'zero': z, 'jacobi': j}
            print(f"| {layer} | {cap} | {z[0]:.2f} | {j[0]:.2f} | {z[1]:.1e} | {j[1]:.1e} |", flush=True)
    return out


if __name__ == '__main__':
    main()
