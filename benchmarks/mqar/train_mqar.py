"""Multi-query associative recall with 2-layer models of equal width: fla_mesa's Mesa, fla's MesaNet, Gated
DeltaNet, GLA and softmax attention (fla's Transformer), over model widths and sequence lengths.

    python benchmarks/mqar/train_mqar.py --quick                        # GPU: small grid, a few minutes; a check
                                                                        # that it runs: too short to learn recall
    python benchmarks/mqar/train_mqar.py                                # GPU: widths 64,128,256 x seq 256,512,1024
    python benchmarks/mqar/train_mqar.py --models mesa --tiny --device cpu   # CPU smoke test (Mesa only)
    python benchmarks/mqar/train_mqar.py --merge a.json b.json          # tables/plot of earlier --out files

Data: `mqar.py` (Zoology-style; `--kv-ratio` sets num_kv_pairs = seq_len / kv_ratio, 256 -> 16, 512 -> 32,
1024 -> 64 by default). Each (model, width, seq_len) cell is trained for `--steps` steps on a fixed training set
(`--train-examples`, cycled in seeded random order) with each learning rate of `--lrs` (AdamW, linear warmup,
cosine decay), and scored on a held-out test set (different seed): accuracy = fraction of query positions whose
argmax prediction is the bound value. The table shows the best accuracy over the learning rates (as Zoology).
Models: see `benchmarks/lm/zoo.py` (heads of dim `--head-dim`, default 64, so width 64 has one head).
The full grid takes longer than 10 minutes: split it with --models / --widths / --seq-lens and --out, then --merge,
or run its cells in parallel over the GPUs with `grid.py`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(HERE, '..', 'lm'))
import common  # noqa: E402  (puts the repo root on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mqar  # noqa: E402
import zoo  # noqa: E402

PRESETS = {
    'full': dict(widths='64,128,256', seq_lens='256,512,1024', vocab_size=8192, kv_ratio=16, steps=2000,
                 batch_size=64, lrs='3e-4,1e-3,3e-3', train_examples=100_000, test_examples=1000, cg_steps=30),
    'quick': dict(widths='64,128', seq_lens='256', vocab_size=8192, kv_ratio=16, steps=400, batch_size=64,
                  lrs='1e-3', train_examples=20_000, test_examples=500, cg_steps=30),
    'tiny': dict(widths='32', seq_lens='64', vocab_size=64, kv_ratio=16, steps=4, batch_size=4, lrs='3e-3',
                 train_examples=64, test_examples=16, cg_steps=5),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', default='all', help=f"comma list of {zoo.ALL_MODELS} or 'all'")
    g = p.add_mutually_exclusive_group()
    g.add_argument('--quick', action='store_true')
    g.add_argument('--tiny', action='store_true', help="CPU smoke preset (use with --models mesa)")
    p.add_argument('--widths', help="comma list of model widths")
    p.add_argument('--seq-lens', help="comma list of sequence lengths")
    for name, typ in (('vocab-size', int), ('kv-ratio', int), ('steps', int), ('batch-size', int),
                      ('train-examples', int), ('test-examples', int), ('cg-steps', int)):
        p.add_argument(f'--{name}', type=typ)
    p.add_argument('--lrs', help="comma list of peak learning rates (best test accuracy is reported)")
    p.add_argument('--head-dim', type=int, default=None, help="head dim (default 64, or the width if smaller)")
    p.add_argument('--layers', type=int, default=2)
    zoo.add_mesa_gate_args(p)
    p.add_argument('--budget-s', type=float, help="stop each cell's training this many seconds after its first step "
                   "(which compiles and autotunes the kernels) and score it (the lr schedule still spans --steps); "
                   "the steps done are recorded")
    p.add_argument('--device', default='auto')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int)
    p.add_argument('--no-autocast', action='store_true')
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--out')
    p.add_argument('--png')
    p.add_argument('--merge', nargs='+')
    return p.parse_args(argv)


def resolve(args) -> dict:
    preset = 'tiny' if args.tiny else 'quick' if args.quick else 'full'
    cfg = common.with_overrides(dict(PRESETS[preset], preset=preset), args)
    cfg['widths'] = [int(x) for x in str(cfg['widths']).split(',')]
    cfg['seq_lens'] = [int(x) for x in str(cfg['seq_lens']).split(',')]
    cfg['lrs'] = [float(x) for x in str(cfg['lrs']).split(',')]
    cfg['layers'] = args.layers
    cfg.update(zoo.mesa_gate_config(args))
    return cfg


def query_logits(model, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[queries, vocab]` logits at the positions of `mask` only: every position's, at L=1024, vocab 8192 and batch
    256, would be 8 GiB in float32 for 64 query positions per example. Every model of the zoo is fla-style: `.model`
    gives the hidden states and `.lm_head` the logits (no logit soft-capping in the zoo's configurations)."""
    if getattr(model.config, 'final_logit_softcapping', None) is not None:
        raise ValueError("query_logits does not apply final_logit_softcapping")
    return model.lm_head(model.model(input_ids=x)[0][mask])


@torch.no_grad()
def accuracy(model, data: mqar.MQARBatch, device, batch_size: int, use_ac: bool) -> float:
    model.eval()
    correct, total = 0, 0
    for i in range(0, data.inputs.shape[0], batch_size):
        x = data.inputs[i:i + batch_size].to(device)
        y = data.labels[i:i + batch_size].to(device)
        mask = y != mqar.IGNORE
        with common.autocast(device, use_ac):
            logits = query_logits(model, x, mask)
        correct += int((logits.argmax(-1) == y[mask]).sum())
        total += int(mask.sum())
    model.train()
    return correct / max(1, total)


def run_cell(name, width, seq_len, lr, cfg, args, train, test, device) -> dict:
    use_ac = not args.no_autocast
    head_dim = args.head_dim or min(64, width)
    torch.manual_seed(args.seed)
    mesa_options, label = zoo.mesa_variant(name, cfg)
    model, info = zoo.build_model(name, width, cfg['layers'], cfg['vocab_size'], device, head_dim=head_dim,
                                  cg_steps=cfg['cg_steps'], max_len=seq_len, **mesa_options)
    opt = common.make_optimizer(model, lr, fused=device.type == 'cuda')
    gen = torch.Generator().manual_seed(args.seed)
    n = train.inputs.shape[0]
    order = torch.randperm(n, generator=gen)
    pos, warmup = 0, max(1, cfg['steps'] // 10)
    t0, t_wall = common.now(device), time.perf_counter()
    last, done = float('nan'), 0
    curve, every = [], max(1, cfg['steps'] // 20)
    bar = common.progress(range(cfg['steps']), desc=f"{name} d={width} L={seq_len} lr={lr:g}", disable=args.no_progress,
               dynamic_ncols=True, mininterval=2.0, leave=False)
    for step in bar:
        if pos + cfg['batch_size'] > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + cfg['batch_size']]
        pos += cfg['batch_size']
        x, y = train.inputs[idx].to(device), train.labels[idx].to(device)
        common.set_lr(opt, common.lr_at(step, cfg['steps'], lr, warmup))
        mask = y != mqar.IGNORE
        with common.autocast(device, use_ac):
            logits = query_logits(model, x, mask)
        loss = F.cross_entropy(logits.float(), y[mask])
        common.optimizer_step(model, opt, loss)
        last = loss.item()
        if not math.isfinite(last):
            raise RuntimeError(f"non-finite loss {last} at step {step}")
        done = step + 1
        if step == 0:
            t_wall = time.perf_counter()
        out_of_time = args.budget_s is not None and time.perf_counter() - t_wall > args.budget_s
        if step % every == 0 or done == cfg['steps'] or out_of_time:
            curve.append((done, round(last, 5)))
            bar.set_postfix(loss=f'{last:.3f}')
        if out_of_time:
            break
    bar.close()
    train_s = common.now(device) - t0
    acc = accuracy(model, test, device, cfg['batch_size'], use_ac)
    res = {'model': label, 'width': width, 'seq_len': seq_len, 'lr': lr, 'seed': args.seed,
           'acc': acc, 'final_loss': last, 'steps_done': done, 'train_s': train_s, 'params': info['params'],
           'info': info, 'ok': True, 'loss_curve': curve}
    print(f"  {res['model']:<15} d={width:<4} L={seq_len:<5} kv={train.num_kv_pairs:<3} lr={lr:<7g} acc {acc:.4f}  "
          f"loss {last:.4f}  {done} steps  {train_s:.1f}s  {info['params'] / 1e6:.2f}M params  loss curve "
          f"{' '.join(f'{s}:{l:.2f}' for s, l in curve[::4] + curve[-1:])}", flush=True)
    del model, opt
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return res


def cell_summary(cell: list[dict]) -> tuple[float, float, float, int] | None:
    """(mean, min, max, number of seeds) of the test accuracy at the learning rate with the best mean over seeds, from
    one cell's results; None if none succeeded."""
    by_lr: dict = {}
    for r in cell:
        if r.get('ok'):
            by_lr.setdefault(r['lr'], []).append(r['acc'])
    if not by_lr:
        return None
    accs = max(by_lr.values(), key=lambda a: sum(a) / len(a))
    return sum(accs) / len(accs), min(accs), max(accs), len(accs)


def best_table(results: list[dict], cfg: dict) -> str:
    models = list(dict.fromkeys(r['model'] for r in results))
    cols = sorted({(r['seq_len'], r['width']) for r in results})
    lines = [f"## MQAR accuracy ({cfg.get('layers', 2)} layers, vocab {cfg.get('vocab_size')}, kv pairs = seq_len / "
             f"{cfg.get('kv_ratio')}, {cfg.get('steps')} steps x batch {cfg.get('batch_size')}, best over lr "
             f"{cfg.get('lrs')} of the mean over seeds; with several seeds, (min-max, seeds))", '',
             '| model | ' + ' | '.join(f"L={L} d={d}" for L, d in cols) + ' |',
             '|---|' + '---|' * len(cols)]
    for m in models:
        row = []
        for L, d in cols:
            cell = [r for r in results if r['model'] == m and r['seq_len'] == L and r['width'] == d]
            summary = cell_summary(cell)
            if summary:
                mean, lo, hi, n = summary
                row.append(f"{mean:.3f}" + (f" ({lo:.3f}-{hi:.3f}, {n})" if n > 1 else ''))
            elif cell:
                row.append('FAILED')
            else:
                row.append('')
        lines.append(f"| {m} | " + ' | '.join(row) + ' |')
    failed = [r for r in results if not r.get('ok')]
    for r in failed:
        lines.append(f"\nFAILED {r['model']} d={r['width']} L={r['seq_len']} lr={r['lr']} seed={r.get('seed')}: "
                     f"{r.get('error', '')[:200]}")
    return '\n'.join(lines)


def plot(results, path):
    if not common.have_matplotlib():
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ok = [r for r in results if r.get('ok')]
    seq_lens = sorted({r['seq_len'] for r in ok})
    if not seq_lens:
        return None
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(4.5 * len(seq_lens), 4), squeeze=False)
    for ax, L in zip(axes[0], seq_lens):
        for m in dict.fromkeys(r['model'] for r in ok):
            ws = sorted({r['width'] for r in ok if r['model'] == m and r['seq_len'] == L})
            means = [cell_summary([r for r in ok if (r['model'], r['seq_len'], r['width']) == (m, L, w)])[0]
                     for w in ws]
            ax.plot(ws, means, 'o-', label=m)
        ax.set_xscale('log', base=2)
        ax.set_xlabel('model width')
        ax.set_ylabel('MQAR accuracy (best lr, mean over seeds)')
        ax.set_title(f'seq_len {L}')
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=.3)
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return common.merge_runs(args.merge, args.png or 'mqar.png', plot, best_table)
    device, cfg, names, vers = common.start_run(args, resolve)
    results = []
    out = {'config': cfg, 'seed': args.seed, 'versions': vers, 'device': str(device), 'results': results}

    def save():  # after every cell, so a run cut short keeps what it finished
        if args.out:
            common.write_json(args.out, out)

    for L in cfg['seq_lens']:
        D = max(1, L // cfg['kv_ratio'])
        t0 = time.perf_counter()
        train = mqar.multiquery_ar(cfg['train_examples'], L, D, cfg['vocab_size'], seed=args.seed)
        test = mqar.multiquery_ar(cfg['test_examples'], L, D, cfg['vocab_size'], seed=args.seed + 1_000_003)
        print(f"seq_len {L}: {D} kv pairs, {cfg['train_examples']} train / {cfg['test_examples']} test examples "
              f"[{time.perf_counter() - t0:.1f}s]")
        for width in cfg['widths']:
            for name in names:
                for lr in cfg['lrs']:
                    try:
                        results.append(run_cell(name, width, L, lr, cfg, args, train, test, device))
                    except Exception as e:  # noqa: BLE001 -- report and go on with the other cells
                        traceback.print_exc()
                        print(f"!!! {name} d={width} L={L} lr={lr:g} FAILED: {type(e).__name__}: {e}")
                        results.append({'model': name, 'width': width, 'seq_len': L, 'lr': lr, 'seed': args.seed,
                                        'ok': False, 'error': f"{type(e).__name__}: {e}"})
                        if device.type == 'cuda':
                            torch.cuda.empty_cache()
                    save()
    return common.finish_run(args, out, 'mqar.png', plot, best_table)


if __name__ == '__main__':
    main()
