"""Seconds from process start to the first finished training step of a byte-level LM, for one model of `zoo.py`.

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/lm/first_step.py --model mesa          # cold Triton cache
    python benchmarks/lm/first_step.py --model gated_deltanet --out first_gdn.json

On a fresh GPU machine the first step is dominated by Triton compiling and autotuning the model's kernels; point
`TRITON_CACHE_DIR` at an empty folder to measure that (the script says whether it was empty). The clock starts at
the process's start time as the kernel records it (`/proc/self/stat`), so interpreter start-up and imports count.
Model: the demo's GPU preset (hidden 512, 6 layers, heads of 128, SwiGLU, vocab 258, about 20M parameters for Mesa);
batch 32 x 512 random token ids, bf16 autocast, fused AdamW. Prints the seconds to imports done, model built,
first step done, and the time of each of the next steps. `--autotune-report FILE` also records, for every kernel
autotuned on the way, its key, the seconds the search took and every configuration's time (the data behind
`fla_mesa/ops/tuning.py`'s narrowed spaces).
"""

from __future__ import annotations

import os
import time


def process_start_epoch() -> float:
    """The process's start time in seconds since the epoch (Linux), else now."""
    try:
        with open('/proc/self/stat') as f:
            start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
        with open('/proc/stat') as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith('btime'))
        return btime + start_ticks / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


T0 = process_start_epoch()

import argparse  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path)
import torch  # noqa: E402
import zoo  # noqa: E402
from corpus import VOCAB_SIZE  # noqa: E402


def since_start(device: torch.device) -> float:
    common.sync(device)
    return time.time() - T0


def record_autotuning(report: list) -> None:
    """Appends to `report` one entry per autotuning search that Triton runs from now on in this process."""
    from triton.runtime.autotuner import Autotuner
    run = Autotuner.run

    def recorded(self, *args, **kwargs):
        known, start = len(self.cache), time.perf_counter()
        out = run(self, *args, **kwargs)
        if len(self.cache) > known:
            timings = getattr(self, 'configs_timings', None) or {}
            report.append({
                'kernel': self.base_fn.__name__, 'seconds': time.perf_counter() - start,
                'key': str(list(self.cache)[-1]),  # the cache is a dict: the newest key is the last
                'configs': sorted(([c.kwargs, c.num_warps, c.num_stages, t[0] if isinstance(t, list) else t]
                                   for c, t in timings.items()), key=lambda e: e[3])})
        return out
    Autotuner.run = recorded


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='mesa', choices=zoo.ALL_MODELS)
    p.add_argument('--device', default='auto')
    p.add_argument('--hidden-size', type=int, default=512)
    p.add_argument('--layers', type=int, default=6)
    p.add_argument('--head-dim', type=int, default=128)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--seq-len', type=int, default=512)
    p.add_argument('--cg-steps', type=int, default=30)
    p.add_argument('--steps', type=int, default=3, help="steps in all; the first is the one timed from start")
    p.add_argument('--out')
    p.add_argument('--autotune-report', help="JSON file for every autotuning search's key, seconds and timings")
    args = p.parse_args(argv)
    report = []
    if args.autotune_report:
        record_autotuning(report)

    cache = os.environ.get('TRITON_CACHE_DIR', os.path.join(os.path.expanduser('~'), '.triton', 'cache'))
    cache_was_empty = not (os.path.isdir(cache) and os.listdir(cache))
    device = common.setup_device(args.device, None)
    t_imports = since_start(device)
    torch.manual_seed(0)
    model, info = zoo.build_model(args.model, args.hidden_size, args.layers, VOCAB_SIZE, device,
                                  head_dim=args.head_dim, cg_steps=args.cg_steps)
    opt = common.make_optimizer(model, 1e-3, fused=device.type == 'cuda')
    ids = torch.randint(0, VOCAB_SIZE, (args.batch_size, args.seq_len), device=device)
    t_built = since_start(device)
    marks = []
    for _ in range(args.steps):
        common.lm_train_step(model, opt, ids, 1e-3, device)
        marks.append(since_start(device))
    out = {'model': args.model, 'params': info['params'], 'triton_cache': cache, 'cache_was_empty': cache_was_empty,
           'imports_s': t_imports, 'model_built_s': t_built, 'first_step_s': marks[0],
           'next_steps_s': [b - a for a, b in zip(marks, marks[1:])], 'versions': common.versions(),
           'shape': [args.batch_size, args.seq_len]}
    print(f"[first_step] {args.model} ({info['params'] / 1e6:.1f}M params), Triton cache {cache} "
          f"{'empty' if cache_was_empty else 'NOT empty'} at start: imports {t_imports:.1f}s, model built "
          f"{t_built:.1f}s, first training step done {marks[0]:.1f}s after process start; next steps "
          + ', '.join(f'{s * 1e3:.0f} ms' for s in out['next_steps_s']))
    if args.out:
        common.write_json(args.out, out)
    if args.autotune_report:
        common.write_json(args.autotune_report, report)
        for e in report:
            print(f"[autotune] {e['kernel']:32s} {e['seconds']:6.1f}s {len(e['configs']):3d} configs, best "
                  f"{e['configs'][0][:3] if e['configs'] else '-'}")
    return out


if __name__ == '__main__':
    main()
