"""Registers, spills and matrix instructions of the chunk kernels, compiled for Hopper (sm_90a) without a GPU.

Usage: python benchmarks/ops/kernel_resources.py [--dims 128 64]
Compiles `chunk_cg_kernel` (with and without its fused output pass, and with the Jacobi preconditioner) and
`chunk_states_kernel` at the launch
configurations `chunk_mesa` uses for bf16 inputs, with Triton's bundled ptxas, and prints ptxas's report (registers,
spill bytes), whether the products are Hopper's wgmma or the older mma.sync, and, from Triton's bundled nvdisasm, the
instruction mix of one iteration of the kernel's first loop (the CG loop; the state kernel's chunk loop): what limits
a kernel before any timing (benchmarks/RESULTS.md).
"""

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from fla_mesa.ops.cg import OUTPUT_BV, cg_launch_config, chunk_cg_kernel
from fla_mesa.ops.states import chunk_states_kernel, states_launch_config

BIN = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')
# the ptxas Triton itself runs for sm_90a (from Triton 3.8 the newer of its two, whose PTX the older rejects)
PTXAS, NVDISASM = get_ptxas(90).path, os.path.join(BIN, 'nvdisasm')
# per thread and iteration: tensor-core instructions (mma.sync, wgmma), shared-memory loads and stores, spill
# reloads and stores (local memory), barriers
LOOP_OPS = ('HMMA', 'HGMMA', 'LDS', 'LDSM', 'STS', 'LDL', 'STL', 'BAR')
TARGET = GPUTarget('cuda', 90, 32)


def compile_kernel(fn, signature: dict, constants: dict, num_warps: int, num_stages: int):
    """`fn` compiled for sm_90a: `signature` maps each runtime argument to its type, `constants` the others."""
    sig = {name: signature.get(name, 'constexpr') for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()})
    return triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))


def report(name: str, compiled) -> str:
    with tempfile.NamedTemporaryFile('w', suffix='.ptx', delete=False) as f:
        f.write(compiled.asm['ptx'])
    res = subprocess.run([PTXAS, '-arch=sm_90a', '-v', f.name, '-o', os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    lines = [re.split(r'ptxas\S* info\s*:', ln)[-1].strip() for ln in res.stderr.splitlines()
             if 'spill' in ln or 'Used' in ln]
    ptx = compiled.asm['ptx']
    mma = 'wgmma' if 'wgmma.mma_async' in ptx else 'mma.sync' if 'mma.sync' in ptx else 'none'
    return f"| {name} | {'; '.join(lines)} | {mma} | {loop_mix(compiled.asm['cubin'])} |"


def loop_mix(cubin: bytes) -> str:
    """The first loop's instruction mix (`count_first_loop`) in a cubin, disassembled by nvdisasm."""
    with tempfile.NamedTemporaryFile(suffix='.cubin', delete=False) as f:
        f.write(cubin)
    sass = subprocess.run([NVDISASM, '-c', f.name], capture_output=True, text=True).stdout.splitlines()
    os.unlink(f.name)
    ops = count_first_loop(sass)
    return 'no loop' if ops is None else f"{sum(ops.values())}: " + ', '.join(
        f"{op} {ops[op]}" for op in LOOP_OPS if ops[op])


def count_first_loop(sass: list[str]) -> collections.Counter | None:
    """Opcodes of the SASS lines from the first loop's label to its backward branch (None without a loop)."""
    labels = {m.group(1): i for i, ln in enumerate(sass) if (m := re.match(r'^(\.L_x_\d+):', ln))}
    loops = [(labels[m.group(1)], i) for i, ln in enumerate(sass)
             if (m := re.search(r'BRA.*`\((\.L_x_\d+)\)', ln)) and labels.get(m.group(1), i) < i]
    if not loops:
        return None
    first, last = min(loops)
    return collections.Counter(m.group(1) for ln in sass[first:last + 1]
                               if (m := re.match(r'\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T],? )?([A-Z0-9_]+)', ln)))


def cg_kernel(K: int, output: bool, precond: bool = False):
    cfg = cg_launch_config(K)
    scaled = K <= 64  # chunk_mesa's states for bf16 inputs: float16 with column scales at K <= 64
    state = dict(h='*fp16', hsc='*fp32') if scaled else dict(h='*fp32')
    sig = dict(b='*bf16', k='*bf16', beta='*fp32', gc='*fp32', lamb='*fp32', x='*fp32', iters='*i32',
               tol_sq='fp32', steps='i32', T='i32', **state)
    const = dict(cu_seqlens=None, chunk_indices=None, H=16, K=K, V=K, BT=64, BR=cfg['BR'], BK=cfg['BK'], BV=OUTPUT_BV,
                 PDT=tl.float16, SCALED_STATES=scaled, SOLVE=True, JACOBI=True, PRECOND=precond, STORE_X=True,
                 STORE_ITERS=False, OUTPUT=output, ADJOINT=False, IS_VARLEN=False, **({} if scaled else dict(hsc=None)))
    if output:
        sig.update(v='*bf16', h_kv=state['h'], o='*bf16', **(dict(hvsc='*fp32') if scaled else {}))
        const.update({} if scaled else dict(hvsc=None))
    else:
        const.update(v=None, h_kv=None, hvsc=None, o=None)
    name = (f"chunk_cg_kernel K={K} rows={cfg['BR']} warps={cfg['num_warps']}{' + output' if output else ''}"
            f"{' + Jacobi preconditioner' if precond else ''}")
    return name, compile_kernel(chunk_cg_kernel, sig, const, cfg['num_warps'], 1)


def states_kernel(K: int):
    cfg = states_launch_config(K, K, pair=True)
    scaled = K <= 64  # as chunk_mesa stores them for bf16 inputs, H's and S's from one launch (V = K)
    state = dict(h='*fp16', hsc='*fp32', h2='*fp16', hsc2='*fp32') if scaled else dict(h='*fp32', h2='*fp32')
    sig = dict(k='*bf16', v='*bf16', v2='*bf16', beta='*fp32', gc='*fp32', T='i32', **state)
    const = dict(h0=None, ht=None, h0_2=None, ht2=None, cu_seqlens=None, chunk_offsets=None, H=16, K=K, V=K, BT=64,
                 BK=cfg['BK'], BV=cfg['BV'], USE_INITIAL_STATE=False, STORE_FINAL_STATE=False, SCALED=scaled,
                 PAIR=True, IS_VARLEN=False, **({} if scaled else dict(hsc=None, hsc2=None)))
    return (f"chunk_states_kernel K=V={K}, both states",
            compile_kernel(chunk_states_kernel, sig, const, cfg['num_warps'], cfg['num_stages']))


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--dims', type=int, nargs='+', default=[128, 64])
    args = p.parse_args()
    print(f"triton {triton.__version__}, target sm_90a\n\n| kernel | ptxas | products | first loop, instructions |"
          "\n|---|---|---|---|")
    for K in args.dims:
        for name, compiled in (cg_kernel(K, False), cg_kernel(K, True), cg_kernel(K, True, precond=True),
                               states_kernel(K)):
            print(report(name, compiled), flush=True)


if __name__ == '__main__':
    main()
