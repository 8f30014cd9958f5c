"""Does decoding gain from warm-starting CG at the previous token's solution? Measured on a trained model.

    python benchmarks/lm/warm_start.py                 # trains the demo's CPU preset (~4 min), then measures
    python benchmarks/lm/warm_start.py --steps 50      # quicker, less trained

Trains `demo.py`'s model, records every Mesa layer's op inputs (q, k, v, g, beta, lamb) on validation windows,
then replays decoding token by token in float64: H_t is stepped exactly, and CG solves (H_t + Lambda) x_t = q_t
from three starts: zero, Jacobi (`q_t / diag(H_t + Lambda)`, the default) and the previous token's solution
`x_{t-1}`. Each solve stops at `||r|| <= tol * ||q_t||` (the same target for every start, unlike `cg_tol`,
which is relative to the start's own residual), at most `--max-steps`. Prints the mean iterations per token.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import corpus  # noqa: E402
import demo  # noqa: E402
from fla_mesa.ops.utils import cg_init_guess, step_states  # noqa: E402

STARTS = ('zero', 'jacobi', 'previous')


def record_op_inputs(model, windows: torch.Tensor) -> list[tuple]:
    """(q, k, v, g, beta, lamb) of every Mesa layer for one forward over `windows`, q and k L2-normalised."""
    import fla_mesa.layers.mesa as mesa_module
    calls, chunk_mesa = [], mesa_module.chunk_mesa

    def recording(q, k, v, g, beta, lamb, **kw):
        calls.append((F.normalize(q.double(), dim=-1), F.normalize(k.double(), dim=-1), v.double(), g.double(),
                      beta.double(), lamb.double()))
        return chunk_mesa(q, k, v, g, beta, lamb, **kw)

    mesa_module.chunk_mesa = recording
    try:
        with torch.no_grad():
            model.eval()(input_ids=windows)
    finally:
        mesa_module.chunk_mesa = chunk_mesa
    return calls


def cg_iterations(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, tol: float, max_steps: int):
    """Batched CG on SPD `a` [N, K, K] from `x` [N, K]; returns the solution and the iterations each system ran
    until `||r|| <= tol * ||b||`."""
    r = b - (a @ x[..., None])[..., 0]
    p, rs = r, (r * r).sum(-1)
    target = (tol * b.norm(dim=-1)) ** 2
    its = torch.zeros(b.shape[0], dtype=torch.long)
    for _ in range(max_steps):
        active = rs > target
        if not active.any():
            break
        ap = (a @ p[..., None])[..., 0]
        alpha = torch.where(active, rs / (p * ap).sum(-1), 0.)[..., None]
        x, r = x + alpha * p, r - alpha * ap
        rs_new = (r * r).sum(-1)
        p = torch.where(active[..., None], r + (rs_new / rs)[..., None] * p, p)
        rs = torch.where(active, rs_new, rs)
        its += active.long()
    return x, its


def replay(q, k, v, g, beta, lamb, tol: float, max_steps: int) -> dict[str, float]:
    """Mean CG iterations per token for each start, decoding the recorded inputs token by token."""
    B, T, H, K = q.shape
    n = B * H
    q, k, v, g, beta = (t.transpose(1, 2).reshape(n, T, *t.shape[3:]) for t in (q, k, v, g, beta))
    lam = lamb.double().repeat(B, 1)                          # [B * H, K]
    h = torch.zeros(n, K, K, dtype=torch.float64)
    h_kv = torch.zeros(n, K, v.shape[-1], dtype=torch.float64)
    prev = {s: torch.zeros(n, K, dtype=torch.float64) for s in STARTS}
    total = {s: 0 for s in STARTS}
    for t in range(T):
        h, h_kv = step_states(h, h_kv, k[:, t], v[:, t], g[:, t], beta[:, t])
        a = h + torch.diag_embed(lam)
        b = q[:, t]
        starts = {'zero': torch.zeros_like(b), 'previous': prev['previous'],
                  'jacobi': cg_init_guess(b, torch.diagonal(a, dim1=-2, dim2=-1), 'jacobi')}
        for s in STARTS:
            x, its = cg_iterations(a, b, starts[s], tol, max_steps)
            prev[s] = x
            total[s] += int(its.sum())
    return {s: total[s] / (n * T) for s in STARTS}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=demo.PRESETS['cpu']['steps'], help="training steps")
    p.add_argument('--windows', type=int, default=4, help="validation windows replayed")
    p.add_argument('--seq-len', type=int, default=demo.PRESETS['cpu']['seq_len'])
    p.add_argument('--tols', default='1e-2,1e-3,1e-4')
    p.add_argument('--max-steps', type=int, default=100)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int)
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    device = common.setup_device('cpu', args.threads)
    cfg = dict(demo.PRESETS['cpu'], steps=args.steps, seq_len=args.seq_len)
    torch.manual_seed(args.seed)
    from fla_mesa import MesaForCausalLM
    print(f"versions: {common.versions()}")
    data = corpus.ByteCorpus.load()
    model = MesaForCausalLM(common.mesa_config(cfg['hidden_size'], cfg['layers'], cfg['head_dim'], cfg['cg_steps']))
    losses, train_s = demo.train(model, data, cfg, device, args.seed, progress=not args.no_progress)
    print(f"trained the demo's CPU model {cfg['steps']} steps in {train_s:.0f}s; last train loss {losses[-1]:.3f}")
    windows = corpus.fixed_windows(data.val, args.windows, cfg['seq_len'])
    calls = record_op_inputs(model, windows)
    tols = [float(t) for t in args.tols.split(',')]
    rows = {}
    print(f"\n| layer | tol (on ||r|| / ||q||) | {' | '.join(STARTS)} |\n|---|---|" + "---|" * len(STARTS))
    for layer, inputs in enumerate(calls):
        for tol in tols:
            means = replay(*inputs, tol=tol, max_steps=args.max_steps)
            rows[(layer, tol)] = means
            print(f"| {layer} | {tol:g} | " + ' | '.join(f"{means[s]:.2f}" for s in STARTS) + ' |', flush=True)
    return {'rows': rows, 'train_losses': losses}


if __name__ == '__main__':
    main()
