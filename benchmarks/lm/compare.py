"""Byte-level LM comparison on the stdlib corpus: fla_mesa's Mesa, fla's MesaNet, Gated DeltaNet, GLA and a
Transformer, trained with equal settings (same data order, steps, batch, schedule, width and depth; see `zoo.py`),
then, for Mesa, validation loss against the number of CG steps at inference (the paper's test-time-compute curve).

    python benchmarks/lm/compare.py --quick                       # GPU, all five models, small (minutes)
    python benchmarks/lm/compare.py                               # GPU, ~27M-parameter models
    python benchmarks/lm/compare.py --models mesa --tiny --device cpu   # CPU smoke test (Mesa only)
    python benchmarks/lm/compare.py --merge a.json b.json         # print tables/plot from earlier --out files

Reports (markdown, printed last): validation loss and bits per byte at equal steps; validation loss at equal wall
time (training time only, eval excluded, after untimed warm-up steps that compile the Triton kernels; the curve of
each model is interpolated linearly in time at the shortest model's total training time); tokens/s; peak GPU memory;
for Mesa the loss at 0/1/2/5/10/30 CG steps and at a tolerance (default 1e-4, at most 30 steps, with the mean
iterations). A PNG (loss vs wall time, Mesa's loss vs CG steps) is written when matplotlib imports.
A model that fails (e.g. a missing kernel) is reported as FAILED with its error; the others still run.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402

import corpus  # noqa: E402
import zoo  # noqa: E402

PRESETS = {
    'full': dict(hidden_size=512, layers=8, head_dim=128, seq_len=512, batch_size=32, steps=1000, lr=2e-3,
                 cg_steps=30, eval_every=50, val_windows=128, compile_steps=3),
    'quick': dict(hidden_size=256, layers=4, head_dim=128, seq_len=512, batch_size=16, steps=200, lr=3e-3,
                  cg_steps=30, eval_every=20, val_windows=32, compile_steps=2),
    'tiny': dict(hidden_size=64, layers=1, head_dim=32, seq_len=64, batch_size=2, steps=3, lr=3e-3,
                 cg_steps=5, eval_every=1, val_windows=2, compile_steps=0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', default='all', help=f"comma list of {zoo.ALL_MODELS} or 'all'")
    g = p.add_mutually_exclusive_group()
    g.add_argument('--quick', action='store_true', help="small preset (GPU: a few minutes for all models)")
    g.add_argument('--tiny', action='store_true', help="CPU smoke-test preset (use with --models mesa)")
    for name, typ in (('steps', int), ('hidden-size', int), ('layers', int), ('head-dim', int), ('seq-len', int),
                      ('batch-size', int), ('lr', float), ('cg-steps', int), ('eval-every', int),
                      ('val-windows', int), ('compile-steps', int)):
        p.add_argument(f'--{name}', type=typ)
    zoo.add_mesa_gate_args(p)
    p.add_argument('--tt-steps', default='0,1,2,5,10,30', help="CG steps for Mesa's test-time-compute curve")
    p.add_argument('--tt-tol', type=float, default=1e-4, help="CG tolerance point of the curve (at most 30 steps)")
    p.add_argument('--tt-max', type=int, default=30)
    p.add_argument('--device', default='auto')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, help="CPU threads (default 1 on CPU)")
    p.add_argument('--no-autocast', action='store_true', help="fp32 on CUDA instead of bf16 autocast")
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--out', help="JSON with every curve and number")
    p.add_argument('--png', default=None, help="plot path (default: next to --out, or compare.png)")
    p.add_argument('--merge', nargs='+', help="only print the tables (and plot) of these --out files together")
    return p.parse_args(argv)


def resolve(args) -> dict:
    preset = 'tiny' if args.tiny else 'quick' if args.quick else 'full'
    return dict(common.with_overrides(dict(PRESETS[preset], preset=preset), args), **zoo.mesa_gate_config(args))


def interp(curve: list[dict], t: float) -> float | None:
    """Validation loss at training time `t`, linear between the curve's points (None before the first point)."""
    pts = [(c['time'], c['val_loss']) for c in curve]
    if not pts or t < pts[0][0] - 1e-9:
        return None
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if t0 <= t <= t1:
            return l0 + (l1 - l0) * (t - t0) / max(t1 - t0, 1e-12)
    return pts[-1][1]


def train_one(name: str, cfg: dict, args, data: corpus.ByteCorpus, val: torch.Tensor, device) -> dict:
    use_ac = not args.no_autocast
    torch.manual_seed(args.seed)
    options, label = zoo.mesa_variant(name, cfg)
    model, info = zoo.build_model(name, cfg['hidden_size'], cfg['layers'], corpus.VOCAB_SIZE, device,
                                  head_dim=cfg['head_dim'], cg_steps=cfg['cg_steps'], max_len=cfg['seq_len'],
                                  bos=corpus.BOS, eos=corpus.EOS, **options)
    print(f"\n=== {label}: {info}")
    fused_opt = device.type == 'cuda'

    # untimed steps that compile/autotune the kernels; the weights are restored afterwards
    if cfg['compile_steps'] > 0:
        state = copy.deepcopy(model.state_dict())
        opt = common.make_optimizer(model, cfg['lr'], fused=fused_opt)
        warm = corpus.TrainBatches(data.train, cfg['batch_size'], cfg['seq_len'], seed=args.seed + 10_000)
        t0 = common.now(device)
        for _ in range(cfg['compile_steps']):
            common.lm_train_step(model, opt, next(warm).to(device), 0.0, device, use_ac)
        common.evaluate(model, val[:2], device, use_autocast=use_ac)
        print(f"  warm-up ({cfg['compile_steps']} untimed steps, lr 0, weights restored): "
              f"{common.now(device) - t0:.1f}s")
        model.load_state_dict(state)
        del opt, state
    opt = common.make_optimizer(model, cfg['lr'], fused=fused_opt)
    batches = corpus.TrainBatches(data.train, cfg['batch_size'], cfg['seq_len'], seed=args.seed)
    warmup = max(1, cfg['steps'] // 10)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    ev0 = common.evaluate(model, val, device, use_autocast=use_ac)
    curve = [{'step': 0, 'time': 0.0, 'val_loss': ev0['loss']}]
    train_losses, train_time = [], 0.0
    bar = common.progress(range(cfg['steps']), desc=name, disable=args.no_progress, dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        ids = next(batches).to(device, non_blocking=True)
        t0 = common.now(device)
        loss = common.lm_train_step(model, opt, ids, common.lr_at(step, cfg['steps'], cfg['lr'], warmup), device,
                                    use_ac)
        lv = loss.item()
        train_time += common.now(device) - t0
        train_losses.append(lv)
        if not math.isfinite(lv):
            raise RuntimeError(f"{name}: non-finite training loss {lv} at step {step}")
        if (step + 1) % cfg['eval_every'] == 0 or step + 1 == cfg['steps']:
            ev = common.evaluate(model, val, device, use_autocast=use_ac)
            curve.append({'step': step + 1, 'time': train_time, 'val_loss': ev['loss']})
            bar.set_postfix(loss=f'{lv:.3f}', val=f"{ev['loss']:.3f}")
    bar.close()
    peak = common.peak_memory_mb(device)
    final = common.evaluate(model, val, device, use_autocast=use_ac)
    tokens = cfg['steps'] * cfg['batch_size'] * cfg['seq_len']
    res = {'name': label, 'info': info, 'ok': True, 'val_loss': final['loss'], 'bpb': final['bpb'],
           'val_start': ev0['loss'], 'train_time': train_time, 'tokens_per_s': tokens / max(train_time, 1e-9),
           'peak_memory_mb': peak, 'curve': curve, 'train_losses': train_losses}
    print(f"  {label}: val loss {ev0['loss']:.4f} -> {final['loss']:.4f} ({final['bpb']:.3f} bpb), "
          f"train {train_time:.1f}s, {res['tokens_per_s']:,.0f} tok/s, peak mem {peak and round(peak)} MB")

    if name == 'mesa':
        tt = []
        for k in [int(s) for s in args.tt_steps.split(',') if s.strip()]:
            t0 = common.now(device)
            with common.cg_setting(model, k, None):
                ev = common.evaluate(model, val, device, use_autocast=use_ac)
            tt.append({'cg': str(k), 'val_loss': ev['loss'], 'bpb': ev['bpb'], 'mean_iters': float(k),
                       'eval_s': common.now(device) - t0})
            print(f"  mesa @ {k:>2} CG steps: val loss {ev['loss']:.4f}")
        t0 = common.now(device)
        st = common.cg_iteration_stats(model, val, device, cg_tol=args.tt_tol, max_steps=args.tt_max,
                                       use_autocast=use_ac)
        tt.append({'cg': f"tol {args.tt_tol:g}", 'val_loss': st['loss'], 'bpb': st['bpb'],
                   'mean_iters': st['mean_iters'], 'eval_s': common.now(device) - t0})
        print(common.format_cg_stats(st))
        res['test_time_compute'] = tt
        res['cg_stats'] = st
        res['mean_cg_iters'] = st['mean_iters']
    del model, opt
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return res


def tables(results: list[dict], cfg: dict) -> str:
    ok = [r for r in results if r.get('ok')]
    t_eq = min((r['train_time'] for r in ok), default=0.0)
    lines = [f"## Byte-level LM on the stdlib corpus ({cfg.get('preset')}: hidden {cfg.get('hidden_size')}, "
             f"{cfg.get('layers')} layers, seq {cfg.get('seq_len')}, batch {cfg.get('batch_size')}, "
             f"{cfg.get('steps')} steps, lr {cfg.get('lr')}, Mesa/MesaNet CG steps {cfg.get('cg_steps')})", '',
             f"| model | params | val loss @ {cfg.get('steps')} steps | bits/byte | train s | tokens/s | "
             f"val loss @ {t_eq:.1f}s (equal wall time) | peak mem MB | note |",
             '|---|---|---|---|---|---|---|---|---|']
    for r in results:
        if not r.get('ok'):
            lines.append(f"| {r['name']} | | FAILED | | | | | | {r.get('error', '')[:80]} |")
            continue
        at_eq = interp(r['curve'], t_eq)
        note = r['info'].get('attention', '')
        if 'cg_stats' in r:
            note = f"mean CG iters @ tol {r['cg_stats']['cg_tol']:g}: {r['mean_cg_iters']:.2f}"
        mem = '' if r['peak_memory_mb'] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['name']} | {r['info']['params'] / 1e6:.2f}M | {r['val_loss']:.4f} | {r['bpb']:.3f} | "
                     f"{r['train_time']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{'' if at_eq is None else f'{at_eq:.4f}'} | {mem} | {note} |")
    for r in ok:
        if 'test_time_compute' in r:
            lines += ['', f"## Mesa: validation loss vs CG steps at inference (trained with {cfg.get('cg_steps')})", '',
                      '| CG at inference | val loss | bits/byte | mean CG iterations |', '|---|---|---|---|']
            for p in r['test_time_compute']:
                lines.append(f"| {p['cg']} | {p['val_loss']:.4f} | {p['bpb']:.3f} | {p['mean_iters']:.2f} |")
    return '\n'.join(lines)


def plot(results: list[dict], path: str) -> str | None:
    if not common.have_matplotlib():
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ok = [r for r in results if r.get('ok')]
    mesa = [r for r in ok if 'test_time_compute' in r]
    fig, axes = plt.subplots(1, 2 if mesa else 1, figsize=(12 if mesa else 6, 4.5), squeeze=False)
    ax = axes[0, 0]
    for r in ok:
        ax.plot([c['time'] for c in r['curve'][1:]], [c['val_loss'] for c in r['curve'][1:]], label=r['name'])
    ax.set_xlabel('training wall time (s)')
    ax.set_ylabel('validation loss (nats/token)')
    ax.legend()
    ax.grid(alpha=.3)
    if mesa:
        ax = axes[0, 1]
        pts = [p for p in mesa[0]['test_time_compute'] if not p['cg'].startswith('tol')]
        ax.plot([p['mean_iters'] for p in pts], [p['val_loss'] for p in pts], 'o-', label='fixed CG steps')
        for p in mesa[0]['test_time_compute']:
            if p['cg'].startswith('tol'):
                ax.plot([p['mean_iters']], [p['val_loss']], 's', color='C3', label=f"{p['cg']} (mean iterations)")
        ax.set_xlabel('CG steps at inference')
        ax.set_ylabel('validation loss')
        ax.set_title('Mesa: test-time compute')
        ax.legend()
        ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return common.merge_runs(args.merge, args.png or 'compare.png', plot, tables)
    device, cfg, names, vers = common.start_run(args, resolve)
    t0 = time.perf_counter()
    data = corpus.ByteCorpus.load()
    val = corpus.fixed_windows(data.val, cfg['val_windows'], cfg['seq_len'] + 1)
    print(data.describe() + f" [{time.perf_counter() - t0:.1f}s]; {val.shape[0]} validation windows of "
          f"{cfg['seq_len']} tokens")

    results = []
    out = {'config': cfg, 'seed': args.seed, 'versions': vers, 'device': str(device),
           'corpus_fingerprint': data.fingerprint, 'results': results}
    for name in names:
        try:
            results.append(train_one(name, cfg, args, data, val, device))
        except Exception as e:  # noqa: BLE001 -- keep the other models going, report the failure
            traceback.print_exc()
            print(f"!!! {name} FAILED: {type(e).__name__}: {e}")
            results.append({'name': name, 'ok': False, 'error': f"{type(e).__name__}: {e}"})
            if device.type == 'cuda':
                torch.cuda.empty_cache()
        if args.out:  # after every model, so a run cut short keeps what it finished
            common.write_json(args.out, out)
    return common.finish_run(args, out, 'compare.png', plot, tables)


if __name__ == '__main__':
    main()
