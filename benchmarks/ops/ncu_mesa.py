"""Where `chunk_mesa`'s kernels spend their time at head dim 64, from Nsight Compute's hardware counters: a target for
`ncu` (`run`) and a reader of its report pages (`read`).

`run --part forward` calls the forward's state pair and its CG kernel (with the output pass) at the Jacobi start with
`cg_tol=1e-2`, the zero start with `cg_tol=3e-3` (each at fla's 30-step error) and the Jacobi start at 30 CG;
`run --part backward` calls the CUDA backward of a 30-step forward from this thread (autograd's own thread would be
outside the NVTX range that `ncu` filters on). Each calls everything twice and profiles the second round.
`read` prints, per profiled kernel, its time, issue-slot use, DRAM throughput and occupancy, and from the sampled warp
stalls of the SASS page how the samples split between the code before the kernel's main loop, the loop and the code
after it (the loop: the instructions executed more often than the kernel's first), with the top stall reasons of
each part and the loop's opcodes by samples.

Usage (B=8 T=2048 H=16 bf16, lamb = 1, `benchmark_mesa.py`'s inputs; on a GPU whose runtime lets ncu read counters):
    ncu --clock-control none --set full --nvtx --nvtx-include 'prof/' -f -o fwd \\
        -k 'regex:chunk_cg_kernel|chunk_state|gla_bwd|mesa_bwd|bwd_solve|chunk_bwd_kernel_dh|chunk_local_cumsum' \\
        python benchmarks/ops/ncu_mesa.py run --part forward
    ncu --import fwd.ncu-rep --page details > fwd-details.txt
    ncu --import fwd.ncu-rep --page source --csv --print-source sass > fwd-sass.csv
    python benchmarks/ops/ncu_mesa.py read fwd-details.txt fwd-sass.csv
The tensor pipes' and DRAM's use alone, printed by ncu itself (the same target, seconds instead of minutes):
    M=gpu__time_duration.sum,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed
    ncu --clock-control none --nvtx --nvtx-include 'prof/' -k 'regex:chunk_cg_kernel|mesa_bwd|chunk_state' \\
        --metrics $M,dram__throughput.avg.pct_of_peak_sustained_elapsed \\
        python benchmarks/ops/ncu_mesa.py run --part forward
"""

import argparse
import collections
import csv
import io
import os
import re
import sys

SAMPLES = 'Warp Stall Sampling (All Samples)'
EXECUTED = 'Instructions Executed'


def run(part: str, D: int = 64):
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchmark_mesa import ZERO_START_TOL, inputs

    import fla_mesa.ops.chunk as chunk
    from fla_mesa.ops.cg import chunk_cg_solve
    from fla_mesa.ops.states import chunk_state_pair_fwd
    q, k, v, g, beta, lamb = inputs(8, 2048, 16, D, False)
    if part == 'forward':
        from fla.ops.utils import chunk_local_cumsum
        from fla.ops.utils.constant import RCP_LN2
        gc = chunk_local_cumsum(g, chunk_size=64, scale=RCP_LN2)
        scaled = chunk.scaled_states(k)
        (h_kk, _), (h_kv, _) = chunk_state_pair_fwd(k, v, beta, gc, scaled=scaled)
        calls = [lambda: chunk_state_pair_fwd(k, v, beta, gc, scaled=scaled)]
        calls += [lambda init=init, tol=tol: chunk_cg_solve(q, k, beta, gc, h_kk, lamb, 30, tol, init, False, v=v,
                                                            h_kv=h_kv)
                  for init, tol in (('jacobi', 1e-2), ('zero', ZERO_START_TOL), ('jacobi', None))]
    else:
        fwd = chunk._cuda_fwd(q, k, v, g, beta, lamb, None, None, 30, None, 'jacobi', False, False, None, None, 64,
                              'none')
        x, gc, do = fwd[3], fwd[5], torch.ones_like(fwd[0])
        calls = [lambda: chunk._cuda_bwd(q, k, v, gc, beta, lamb, None, None, x, do, None, None, 30, None, 'jacobi',
                                         True, None, None, 64, 'none')]
    for profiled in (False, True):
        if profiled:
            torch.cuda.nvtx.range_push('prof')
        for call in calls:
            call()
        torch.cuda.synchronize()
        if profiled:
            torch.cuda.nvtx.range_pop()


def details(text: str) -> list[dict]:
    """Per kernel of an ncu `--page details` text: its name and the metrics `read` prints (as printed, with units)."""
    names = {'Duration': 'time', 'Issue Slots Busy': 'issue busy', 'DRAM Throughput': 'DRAM',
             'Achieved Occupancy': 'occupancy', 'Registers Per Thread': 'registers',
             'Eligible Warps Per Scheduler': 'eligible warps'}
    out = []
    for block in re.split(r'\n  (?=\S)', '\n' + text):
        head = re.match(r'(\w+) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)', block)
        if not head:
            continue
        row = {'kernel': head.group(1)}
        for metric, key in names.items():
            m = re.search(r'\n\s+' + re.escape(metric) + r'\s+(\S+(?: \S+)?)\s+([\d,.]+)\n', block)
            if m and key not in row:
                unit = '' if key in ('registers', 'eligible warps') else m.group(1)
                row[key] = f"{m.group(2)} {unit}".strip()
        out.append(row)
    return out


def sass_sections(text: str) -> list[tuple[str, list[dict]]]:
    """The kernels of an ncu `--page source --csv --print-source sass` page: (name, its instruction rows)."""
    sections, lines = [], None
    for line in text.splitlines():
        if line.startswith('"Kernel Name"'):
            lines = []
            sections.append((next(csv.reader([line]))[1], lines))
        elif lines is not None:
            lines.append(line)
    return [(name, list(csv.DictReader(io.StringIO('\n'.join(lines))))) for name, lines in sections]


def split(rows: list[dict]) -> dict[str, list[dict]]:
    """A kernel's instruction rows before its main loop, in it and after it: the loop is the span of the rows run
    more often than the kernel's first instruction. A kernel without a loop is one part."""
    runs = [int(r[EXECUTED]) for r in rows]
    hot = [i for i, n in enumerate(runs) if n > 1.5 * runs[0]]
    if not hot:
        return {'no loop': rows}
    return {'before the loop': rows[:hot[0]], 'loop': rows[hot[0]:hot[-1] + 1], 'after it': rows[hot[-1] + 1:]}


def stall_summary(rows: list[dict], top: int = 4) -> str:
    reasons = collections.Counter()
    for r in rows:
        for key, value in r.items():
            if key.startswith('stall_') and '(Not Issued)' not in key:
                reasons[key[len('stall_'):]] += int(value)
    total = sum(reasons.values()) or 1
    return ', '.join(f"{k} {v / total:.0%}" for k, v in reasons.most_common(top) if v)


def opcode_summary(rows: list[dict], top: int = 6) -> str:
    samples = collections.Counter()
    for r in rows:
        words = r['Source'].split()
        if words and words[0].startswith('@'):  # a predicate
            words = words[1:]
        samples[words[0].split('.')[0] if words else '?'] += int(r[SAMPLES])
    total = sum(samples.values()) or 1
    return ', '.join(f"{k} {v / total:.0%}" for k, v in samples.most_common(top))


def read(details_path: str, sass_path: str):
    with open(details_path) as f:
        kernels = details(f.read())
    with open(sass_path) as f:
        sections = sass_sections(f.read())
    print("| kernel | time | issue slots busy | DRAM of peak | achieved occupancy | registers | eligible warps a "
          "scheduler |\n|---|---|---|---|---|---|---|")
    for k in kernels:
        print(f"| {k['kernel']} | " + ' | '.join(k.get(key, '') for key in ('time', 'issue busy', 'DRAM',
                                                                              'occupancy', 'registers',
                                                                              'eligible warps')) + ' |')
    parts = [(name, rows, split(rows)) for name, rows in sections]
    print("\n| kernel | part | samples | warp instructions | top stalls |\n|---|---|---|---|---|")
    for name, rows, split_rows in parts:
        total = sum(int(r[SAMPLES]) for r in rows) or 1
        for part, part_rows in split_rows.items():
            n = sum(int(r[SAMPLES]) for r in part_rows)
            if n:
                print(f"| {name} | {part} | {n / total:.0%} | {sum(int(r[EXECUTED]) for r in part_rows)} | "
                      f"{stall_summary(part_rows)} |")
    print("\n| kernel | the loop's samples by opcode |\n|---|---|")
    for name, _, split_rows in parts:
        if 'loop' in split_rows:
            print(f"| {name} | {opcode_summary(split_rows['loop'])} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    r = sub.add_parser('run', help="the target for ncu (GPU)")
    r.add_argument('--part', choices=('forward', 'backward'), default='forward')
    r.add_argument('--dim', type=int, default=64)
    s = sub.add_parser('read', help="summarise ncu's details and SASS source pages")
    s.add_argument('details')
    s.add_argument('sass')
    args = p.parse_args()
    if args.cmd == 'run':
        run(args.part, args.dim)
    else:
        read(args.details, args.sass)


if __name__ == '__main__':
    main()
