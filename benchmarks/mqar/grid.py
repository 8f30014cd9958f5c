"""The MQAR grid in parallel: one `train_mqar.py` process per (model, width, seq_len) cell, spread over the GPUs,
then the merged table and plot (`train_mqar.py --merge`).

    python benchmarks/mqar/grid.py --gpus 0,1,2,3 --out-dir mqar_grid -- --steps 1500 --budget-s 420
    python benchmarks/mqar/grid.py --device cpu --jobs 2 --models mesa --widths 32 --seq-lens 64 -- --tiny
    python benchmarks/mqar/grid.py --seeds 0,1,2 ...      (each cell three times; the table: mean (min-max, seeds))

Everything after `--` goes to every `train_mqar.py` process (its presets and options; `--seeds` sets `--seed`).
Tiny models do not fill a GPU, so all cells run at once: `--gpus` lists one slot per share, and a GPU named twice
takes twice the share of the cells (the cells are placed longest first on the least loaded slot, by an estimate of
their cost). With `--budget-s` each process stops training that many seconds after its first step and records its
steps.

First, one short run per row (`--warmup-steps`, smallest cell, one per slot at a time) compiles the kernels and
fills fla's autotuning cache (kept in TRITON_CACHE_DIR): the grid's processes then start from it. Without it,
dozens of processes autotuning fla's kernels at once on a shared GPU took 400 s for a first step (RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, 'train_mqar.py')
ALL_MODELS = ('transformer', 'gated_deltanet', 'gla', 'mesanet', 'mesa')
# relative cost of a training step at equal width and length (measured order on the GPU: Mesa slowest)
MODEL_COST = {'transformer': 1, 'gla': 1, 'gated_deltanet': 2, 'mesanet': 3, 'mesa': 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', default=','.join(ALL_MODELS))
    p.add_argument('--mesa-gate-rows', default='mamba_gate,gate_bias3',
                   help="comma list of extra Mesa rows: 'mamba_gate' (--mesa-mamba-gate), 'gate_biasB' "
                        "(--mesa-gate-bias B), and fla MesaNet rows 'mesanet_gate_biasB' (--mesanet-gate-bias B); '' "
                        "for none. Default: both long-memory starts of Mesa that learned the "
                        "vocab-8192 L=256 cell (benchmarks/RESULTS.md)")
    p.add_argument('--seeds', default='0', help="comma list of seeds (data and initialisation): one process per "
                                                 "cell and seed; the table gives the mean over seeds")
    p.add_argument('--widths', default='64,128,256')
    p.add_argument('--seq-lens', default='256,512,1024')
    p.add_argument('--gpus', help="comma list of CUDA device slots (default: one per visible GPU)")
    p.add_argument('--device', default='cuda')
    p.add_argument('--jobs', type=int, default=2, help="processes at once with --device cpu")
    p.add_argument('--warmup-steps', type=int, default=2, help="steps of the warm-up run of each row (0: none)")
    p.add_argument('--out-dir', default='mqar_grid')
    p.add_argument('--png')
    p.add_argument('rest', nargs=argparse.REMAINDER, help="-- then train_mqar.py options")
    args = p.parse_args(argv)
    args.rest = args.rest[1:] if args.rest[:1] == ['--'] else args.rest
    return args


def rows(args) -> list[tuple[str, list[str]]]:
    """(row label, train_mqar.py model options) for each row of the table."""
    out = [(m, ['--models', m]) for m in args.models.split(',') if m]
    for extra in filter(None, args.mesa_gate_rows.split(',')):
        if extra == 'mamba_gate':
            out.append(('mesa+mamba_gate', ['--models', 'mesa', '--mesa-mamba-gate']))
        elif extra.startswith(('gate_bias', 'mesanet_gate_bias')):
            model = 'mesanet' if extra.startswith('mesanet') else 'mesa'
            bias = float(extra.split('gate_bias', 1)[1])
            out.append((f'{model}+gate_bias{bias:g}', ['--models', model, f'--{model}-gate-bias', str(bias)]))
        else:
            raise SystemExit(f"--mesa-gate-rows: unknown row {extra!r} (expected 'mamba_gate', 'gate_biasB' or "
                             "'mesanet_gate_biasB')")
    return out


def train_cmd(opts: list[str], width: int, seq_len: int, args, *extra: str) -> list[str]:
    return [sys.executable, TRAIN, *opts, '--widths', str(width), '--seq-lens', str(seq_len), '--no-progress',
            *args.rest, *extra]


def jobs(args, widths: list[int], seq_lens: list[int]) -> list[dict]:
    out = []
    for label, opts in rows(args):
        for L in seq_lens:
            for d in widths:
                for seed in (int(s) for s in args.seeds.split(',')):
                    name = f"{label.replace('+', '_')}_d{d}_L{L}_s{seed}"
                    out.append({'name': name, 'label': label, 'width': d, 'seq_len': L,
                                'cost': MODEL_COST.get(opts[1], 4) * L * max(d, 128),
                                'cmd': train_cmd(opts, d, L, args, '--seed', str(seed),
                                                 '--out', os.path.join(args.out_dir, name + '.json'))})
    return out


def warmups(args, widths: list[int], seq_lens: list[int]) -> list[dict]:
    """One short run per row at the smallest cell: compiles and autotunes that row's kernels."""
    out = []
    for label, opts in rows(args):
        name = f"_warmup_{label.replace('+', '_')}"
        out.append({'name': name, 'cost': 1,
                    'cmd': train_cmd(opts, min(widths), min(seq_lens), args, '--steps', str(args.warmup_steps),
                                     '--train-examples', '256', '--test-examples', '16',
                                     '--png', os.path.join(args.out_dir, name + '.png'))})  # not the cwd
    return out


def run_all(todo: list[dict], width: int, args) -> list[dict]:
    """Runs `todo`, at most `width` processes at once; returns the jobs that failed."""
    t0 = time.perf_counter()
    running, pending, failed = [], list(todo), []
    while pending or running:
        while pending and len(running) < width:
            job = pending.pop(0)
            running.append((job, launch(job, args)))
        time.sleep(1.0)
        for job, proc in list(running):
            if proc.poll() is not None:
                running.remove((job, proc))
                if proc.returncode != 0:
                    failed.append(job)
                print(f"[{time.perf_counter() - t0:6.0f}s] {job['name']} {'done' if proc.returncode == 0 else 'FAILED'}"
                      f"{' on GPU ' + job['gpu'] if 'gpu' in job else ''}", flush=True)
    return failed


def place(todo: list[dict], slots: list[str]) -> None:
    """Longest cell first onto the least loaded slot."""
    load = [0.0] * len(slots)
    for job in sorted(todo, key=lambda j: -j['cost']):
        i = min(range(len(slots)), key=lambda s: load[s])
        load[i] += job['cost']
        job['gpu'] = slots[i]


def launch(job: dict, args) -> subprocess.Popen:
    env = dict(os.environ)
    if 'gpu' in job:
        env['CUDA_VISIBLE_DEVICES'] = job['gpu']
    cmd = job['cmd'] + ['--device', 'cuda' if 'gpu' in job else args.device, '--threads', '1']
    log = open(os.path.join(args.out_dir, job['name'] + '.log'), 'w')
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    widths, seq_lens = ([int(x) for x in a.split(',')] for a in (args.widths, args.seq_lens))
    todo = jobs(args, widths, seq_lens)
    warm = warmups(args, widths, seq_lens) if args.warmup_steps > 0 else []
    if args.device == 'cuda':
        import torch
        n = torch.cuda.device_count()
        if n == 0:
            raise SystemExit("--device cuda: no GPU is visible (use --device cpu)")
        slots = args.gpus.split(',') if args.gpus else [str(i) for i in range(n)]
        distinct = list(dict.fromkeys(slots))
        for i, job in enumerate(warm):
            job['gpu'] = distinct[i % len(distinct)]
        place(todo, slots)
        warm_width, width = len(distinct), len(todo)
    else:
        warm_width = width = args.jobs
    if warm and run_all(warm, warm_width, args):
        raise SystemExit(f"a warm-up run failed: see {args.out_dir}/_warmup_*.log")
    failed = run_all(todo, width, args)
    outs = [os.path.join(args.out_dir, j['name'] + '.json') for j in todo]
    done = [p for p in outs if os.path.exists(p)]
    missing = [j for j, p in zip(todo, outs) if not os.path.exists(p)]
    if missing:  # a process that died before its first cell finished: a FAILED entry in the table
        failed_path = os.path.join(args.out_dir, '_failed.json')
        with open(failed_path, 'w') as f:
            json.dump({'config': {}, 'results': [{'model': j['label'], 'width': j['width'], 'seq_len': j['seq_len'],
                                                 'lr': None, 'ok': False, 'error': f"no result: see {j['name']}.log"}
                                                for j in missing]}, f)
        done.append(failed_path)
    if not done:
        raise SystemExit("no process left a result")
    sys.path.insert(0, HERE)
    import train_mqar
    merged = train_mqar.main(['--merge', *done, '--png', args.png or os.path.join(args.out_dir, 'mqar.png')])
    with open(os.path.join(args.out_dir, 'merged.json'), 'w') as f:
        json.dump(merged, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
