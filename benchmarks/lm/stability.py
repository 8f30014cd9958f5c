"""Long bf16 training runs of the byte-level Mesa LM: is every loss and gradient finite, and how many CG
iterations do the tokens need?

    python benchmarks/lm/stability.py --out stability.json                 # GPU: 2000 steps, two runs
    python benchmarks/lm/stability.py --device cpu --small --steps 20      # CPU smoke test

Runs (`--runs`): `fixed30` trains with 30 CG steps per token; `tol` trains with CG stopped at relative residual
`--tol` (default 1e-4, at most 30 steps). Model and data: the demo's GPU preset (hidden 512, 6 layers, heads of
128, about 20M parameters; 32 x 512 byte windows of the stdlib corpus, AdamW, warm-up + cosine, clipping at 1),
bf16 autocast on CUDA. Every step checks that the loss and the total gradient norm (before clipping) are finite
and the run stops at the first that is not. For the `tol` run the mean CG iterations per token during training
are sampled every `--iters-every` steps. After each run: validation loss with the training setting, then the mean
CG iterations per token at `--tol` on validation with the Jacobi start (the paper's) and with the zero start; after
`fixed30`, also the test-time-compute table (`common.test_time_compute_table`) unless `--no-table`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path)
import corpus  # noqa: E402
import demo  # noqa: E402
import torch  # noqa: E402

RUNS = ('fixed30', 'tol')


def mean_iters(layers) -> float:
    return sum(m.last_cg_iters.float().mean().item() for m in layers) / len(layers)


def train_checked(model, data, cfg: dict, device, seed: int, iters_every: int, progress: bool) -> dict:
    """Training as `demo.train`, plus the gradient-norm check and CG-iteration sampling."""
    opt = common.make_optimizer(model, cfg['lr'], fused=device.type == 'cuda')
    batches = corpus.TrainBatches(data.train, cfg['batch_size'], cfg['seq_len'], seed=seed)
    layers = common.mesa_layers(model)
    warmup = max(1, cfg['steps'] // 10)
    losses, grad_norms, iters = [], [], []
    first_bad = None
    model.train()
    t0 = common.now(device)
    bar = common.progress(range(cfg['steps']), desc='train', disable=not progress, dynamic_ncols=True,
                          mininterval=1.0)
    for step in bar:
        sample = iters_every > 0 and step % iters_every == 0
        for m in layers:
            m.record_cg_iters = sample
        common.set_lr(opt, common.lr_at(step, cfg['steps'], cfg['lr'], warmup))
        ids = next(batches).to(device, non_blocking=True)
        with common.autocast(device):
            loss = common.causal_lm_loss(model, ids)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        losses.append(loss.item())
        grad_norms.append(gnorm.item())
        if sample:
            iters.append((step, mean_iters(layers)))
        if not (math.isfinite(losses[-1]) and math.isfinite(grad_norms[-1])):
            first_bad = step
            break
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f'{losses[-1]:.3f}')
    bar.close()
    for m in layers:
        m.record_cg_iters = False
    return {'losses': losses, 'grad_norms': grad_norms, 'train_iters': iters, 'first_nonfinite_step': first_bad,
            'train_seconds': common.now(device) - t0}


def run_one(name: str, args, cfg: dict, data, val, device) -> dict:
    torch.manual_seed(args.seed)
    from fla_mesa import MesaForCausalLM
    tol = args.tol if name == 'tol' else None
    config = common.mesa_config(cfg['hidden_size'], cfg['layers'], cfg['head_dim'], 30, device.type,
                                max_len=max(2048, cfg['seq_len']), cg_tol=tol)
    model = MesaForCausalLM(config).to(device)
    print(f"\n[{name}] {common.count_params(model) / 1e6:.2f}M params, training with 30 CG steps"
          f"{'' if tol is None else f' stopped at tol {tol:g}'}, {cfg['steps']} steps")
    res = train_checked(model, data, cfg, device, args.seed, args.iters_every if tol is not None else 0,
                        not args.no_progress)
    steps_done = len(res['losses'])
    finite = res['first_nonfinite_step'] is None
    bad = '' if finite else f" (first non-finite at step {res['first_nonfinite_step']})"
    print(f"[{name}] {steps_done} steps in {res['train_seconds']:.1f}s; all losses and gradient norms finite: "
          f"{finite}{bad}; loss first {res['losses'][0]:.4f}, last {res['losses'][-1]:.4f}; max gradient norm "
          f"{max(res['grad_norms']):.3g}")
    if res['train_iters']:
        its = [x for _, x in res['train_iters']]
        print(f"[{name}] mean CG iterations per token in training (every {args.iters_every} steps): "
              f"mean {sum(its) / len(its):.2f}, first {its[0]:.2f}, last {its[-1]:.2f}")
    res['name'], res['cg_tol'], res['params'] = name, tol, common.count_params(model)
    if not finite:
        return res
    res['val'] = common.evaluate(model, val, device)
    print(f"[{name}] validation loss with the training setting: {res['val']['loss']:.4f} "
          f"({res['val']['bpb']:.3f} bits/byte)")
    res['cg_at_tol'] = {}
    for init in ('jacobi', 'zero'):
        st = common.cg_iteration_stats(model, val, device, cg_tol=args.tol, max_steps=30, cg_init=init)
        res['cg_at_tol'][init] = st
        print(f"[{name}] {init} start, tol {args.tol:g}: validation loss {st['loss']:.4f}, mean CG iterations "
              f"{st['mean_iters']:.2f} (per layer {[round(s['mean'], 2) for s in st['layers'].values()]})")
    if name == 'fixed30' and not args.no_table:
        prompt = corpus.encode_text('def ')[None].to(device)
        res['table'] = common.test_time_compute_table(model, val, device, prompt, decode_tokens=64)
        print(f"[{name}] test-time compute on this model:\n" + common.format_test_time_table(res['table']))
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='auto')
    p.add_argument('--runs', default=','.join(RUNS), help=f"comma-separated subset of {RUNS}")
    p.add_argument('--steps', type=int, default=2000)
    p.add_argument('--tol', type=float, default=1e-4)
    p.add_argument('--iters-every', type=int, default=50)
    p.add_argument('--small', action='store_true', help="the demo's CPU model instead of its GPU preset")
    p.add_argument('--val-windows', type=int)
    p.add_argument('--no-table', action='store_true')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--out')
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(',') if r.strip()]
    if not runs or any(r not in RUNS for r in runs):
        raise SystemExit(f"--runs {args.runs!r}: choose from {RUNS}")
    device = common.setup_device(args.device, None)
    cfg = dict(demo.PRESETS['cpu' if args.small else 'big'], steps=args.steps)
    if args.val_windows:
        cfg['val_windows'] = args.val_windows
    print(f"versions: {common.versions()}\ndevice {device}, seed {args.seed}, config {cfg}, runs {runs}")
    data = corpus.ByteCorpus.load()
    val = corpus.fixed_windows(data.val, cfg['val_windows'], cfg['seq_len'] + 1)
    out = {'config': cfg, 'seed': args.seed, 'tol': args.tol, 'versions': common.versions(), 'runs': {}}
    t0 = time.perf_counter()
    for name in runs:
        out['runs'][name] = run_one(name, args, cfg, data, val, device)
        if args.out:
            common.write_json(args.out, out)
    print(f"\n| run | steps | all finite | max grad norm | val loss | mean CG iters @ tol {args.tol:g}: jacobi | zero |"
          f"\n|---|---|---|---|---|---|---|")
    for name, r in out['runs'].items():
        cg = r.get('cg_at_tol', {})
        cells = [f"{cg[i]['mean_iters']:.2f}" if i in cg else '-' for i in ('jacobi', 'zero')]
        val_loss = f"{r['val']['loss']:.4f}" if 'val' in r else '-'
        print(f"| {name} | {len(r['losses'])} | {r['first_nonfinite_step'] is None} | {max(r['grad_norms']):.3g} | "
              f"{val_loss} | {cells[0]} | {cells[1]} |")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return out


if __name__ == '__main__':
    main()
