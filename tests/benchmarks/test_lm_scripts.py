"""Tiny CPU runs of benchmarks/lm/stability.py, first_step.py, throughput.py, cg_precond_trained.py and
adjoint_start_trained.py, of the emulations benchmarks/ops/tf32_emulation.py and half_states_emulation.py, of the
preconditioning study benchmarks/ops/cg_preconditioning.py and of the SASS loop count of
benchmarks/ops/kernel_resources.py, the Nsight Compute reader of benchmarks/ops/ncu_mesa.py, and the CG and
GLA-gradient benchmarks' kernel launches."""

import json
import math
import os
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, 'benchmarks', 'lm')) if p not in sys.path]

from test_corpus_and_mqar import load  # noqa: E402


def test_stability_smoke(tmp_path):
    stability = load(os.path.join(ROOT, 'benchmarks', 'lm', 'stability.py'), 'lm_stability')
    out = stability.main(['--device', 'cpu', '--small', '--steps', '4', '--iters-every', '2', '--val-windows', '4',
                          '--no-table', '--no-progress', '--out', str(tmp_path / 's.json')])
    assert set(out['runs']) == {'fixed30', 'tol'}
    for name, r in out['runs'].items():
        assert r['first_nonfinite_step'] is None and len(r['losses']) == 4
        assert all(math.isfinite(x) for x in r['losses'] + r['grad_norms'])
        assert set(r['cg_at_tol']) == {'jacobi', 'zero'}
        assert all(0 < s['mean_iters'] <= 30 for s in r['cg_at_tol'].values())
    assert out['runs']['tol']['cg_tol'] == 1e-4 and out['runs']['fixed30']['cg_tol'] is None
    assert [s for s, _ in out['runs']['tol']['train_iters']] == [0, 2]
    assert json.loads((tmp_path / 's.json').read_text())['runs']['tol']['losses'] == out['runs']['tol']['losses']
    with pytest.raises(SystemExit):
        stability.main(['--device', 'cpu', '--runs', 'fixed10'])


def test_first_step_smoke():
    first_step = load(os.path.join(ROOT, 'benchmarks', 'lm', 'first_step.py'), 'lm_first_step')
    out = first_step.main(['--device', 'cpu', '--hidden-size', '64', '--layers', '1', '--head-dim', '32',
                           '--batch-size', '2', '--seq-len', '16', '--steps', '2'])
    assert 0 < out['imports_s'] <= out['model_built_s'] <= out['first_step_s']
    assert len(out['next_steps_s']) == 1 and out['next_steps_s'][0] > 0


def test_throughput_smoke():
    throughput = load(os.path.join(ROOT, 'benchmarks', 'lm', 'throughput.py'), 'lm_throughput')
    (row,) = throughput.main(['--models', 'mesa', '--device', 'cpu', '--hidden-size', '64', '--layers', '1',
                              '--vocab-size', '300', '--head-dim', '32', '--batch-size', '1', '--seq-len', '32',
                              '--warmup', '1', '--iters', '1'])
    assert row['model'] == 'mesa' and row['tokens_per_s'] > 0 and row['peak_memory_gib'] is None


def test_tf32_emulation_rounds_and_restores():
    import torch
    emu = load(os.path.join(ROOT, 'benchmarks', 'ops', 'tf32_emulation.py'), 'ops_tf32_emulation')
    # tf32 keeps 10 stored mantissa bits (a step of 2^-10 at 1): truncated as the GPU does, or rounded to nearest
    x = torch.tensor([1 + 2 ** -12, 1 + 3 * 2 ** -12, 1 + 2 ** -9], dtype=torch.float32)
    assert emu.tf32(x).tolist() == [1.0, 1.0, 1 + 2 ** -9]
    assert emu.tf32(x, 'rn').tolist() == [1.0, 1 + 2 ** -10, 1 + 2 ** -9]
    einsum, solve = torch.einsum, emu.chunk_module.torch_chunk_cg_solve
    rows = emu.main(['--cases', 'T1K64mid'])
    assert torch.einsum is einsum and emu.chunk_module.torch_chunk_cg_solve is solve
    # float32 products stay at float32's level; rounded ones land at a few units of 2^-11 (1.3e-3 to 3.8e-3 here)
    for (_, label, _), errs in rows.items():
        worst = max(errs.values())
        assert worst < 1e-5 if label == 'float32' else 2 ** -14 < worst < 16 * 2 ** -11, (label, errs)


def test_half_states_emulation_scales_per_column_and_separates_bf16():
    import torch
    emu = load(os.path.join(ROOT, 'benchmarks', 'ops', 'half_states_emulation.py'), 'ops_half_states_emulation')
    # one power of two per column: a column 1e-8 times another keeps float16's 2^-11 relative rounding; bf16 2^-8
    t = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0)) * torch.logspace(-8, 0, 8)
    for mode, dim, bound in (('fp16', -2, 2 ** -11), ('bf16', -2, 2 ** -8), ('fp16', -1, 1.0)):
        col_err = ((emu.to_half(t, mode, dim) - t).abs() / t.abs().amax(-2, keepdim=True)).amax((0, 1))
        assert (col_err <= bound).all() if bound < 1 else col_err[0] > 2 ** -11, (mode, dim, col_err)
    states, fwd, einsum = emu.chunk_module.chunk_states, emu.chunk_module._torch_fwd, torch.einsum
    rows = emu.main(['--T', '70', '--dims', '32'])
    assert (emu.chunk_module.chunk_states, emu.chunk_module._torch_fwd, torch.einsum) == (states, fwd, einsum)
    # the study's finding at a small size: float16 states or x with scales stay within 1.5x of float32's worst error
    # (1.2x here), bf16 ones more than double it (3.4-4.8x here)
    base = max(rows[32, None, None].values())
    assert 2 ** -14 < base < 4 * 2 ** -11
    for (_, states_mode, x_mode), errs in rows.items():
        if 'bf16' in (states_mode, x_mode):
            assert max(errs.values()) > 2 * base, (states_mode, x_mode, errs)
        else:
            assert max(errs.values()) < 1.5 * base, (states_mode, x_mode, errs)


def test_cg_preconditioning_study_solves_and_counts():
    """benchmarks/ops/cg_preconditioning.py: both solvers reach the exact solution, and with lambda spread over
    channels the preconditioned one needs fewer iterations (the study's finding, at a small size)."""
    import torch
    study = load(os.path.join(ROOT, 'benchmarks', 'ops', 'cg_preconditioning.py'), 'ops_cg_preconditioning')
    T, H, D = 128, 2, 32
    q, k, g, beta = study.inputs(T, H, D, key_spread=0.5)
    lamb = torch.exp(torch.linspace(math.log(0.25), math.log(5.0), H * D)).view(H, D)
    # the exact solve: H_t = gamma_t H_{t-1} + beta_t k_t k_t^T, in float64
    h, exact = torch.zeros(H, D, D, dtype=torch.float64), []
    for t in range(T):
        kt = k[0, t].double()
        h = g[0, t].double().exp()[:, None, None] * h + beta[0, t].double()[:, None, None] * kt[:, :, None] \
            * kt[:, None]
        exact.append(torch.linalg.solve(h + torch.diag_embed(lamb.double()), q[0, t].double()))
    exact = torch.stack(exact)[None]
    iters = {}
    for pre in (False, True):
        x, iters[pre] = study.solve_iterations(q, k, g, beta, lamb, 60, None, pre)
        assert ((x.double() - exact).norm() / exact.norm()).item() < 1e-5
        assert iters[pre].max() < 60
    assert iters[True].mean() < 0.75 * iters[False].mean()  # 10.1 against 15.8 here; the ratio is 0.35 at D=128
    study.main(['--T', '64', '--H', '1', '--D', '16', '--steps', '5'])


def test_cg_precond_trained_smoke():
    """benchmarks/lm/cg_precond_trained.py, tiny: both CG variants give the same validation loss (both converge),
    and a tolerance never needs more iterations than the float32 floor."""
    trained = load(os.path.join(ROOT, 'benchmarks', 'lm', 'cg_precond_trained.py'), 'lm_cg_precond_trained')
    out = trained.main(['--device', 'cpu', '--steps', '2', '--seq-len', '32', '--batch-size', '2', '--hidden-size',
                        '64', '--head-dim', '32', '--val-windows', '4'])
    assert set(out) == {(tol, pre) for tol in (None, 1e-4) for pre in ('none', 'jacobi')}
    for pre in ('none', 'jacobi'):
        assert abs(out[(None, pre)][0] - out[(None, 'none')][0]) < 1e-4
        assert all(0 < t <= f <= 30 for t, f in zip(out[(1e-4, pre)][1], out[(None, pre)][1]))


def test_adjoint_start_trained_smoke():
    """benchmarks/lm/adjoint_start_trained.py, tiny: every layer's backward solves measured from both starts at both
    caps, a cap that binds never beats a looser one, and both starts reach the float64 solve."""
    trained = load(os.path.join(ROOT, 'benchmarks', 'lm', 'adjoint_start_trained.py'), 'lm_adjoint_start_trained')
    out = trained.main(['--device', 'cpu', '--steps', '2', '--seq-len', '32', '--batch-size', '2', '--hidden-size',
                        '64', '--head-dim', '32', '--cg-steps', '3'])
    assert set(out) == {(layer, cap) for layer in range(2) for cap in (3, 30)}
    for layer in range(2):
        for start in ('zero', 'jacobi'):
            capped, free = out[layer, 3][start], out[layer, 30][start]
            assert 0 < capped[0] <= min(free[0], 3) and free[0] <= 30
            assert free[1] < 1e-3 and capped[1] >= free[1] - 1e-6


SASS = """\
        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;
.L_x_3:
        /*0010*/                   LDS R4, [R5] ;
        /*0020*/                   HMMA.1688.F32.TF32 R8, R12, R16, R8 ;
        /*0030*/                   LDS.64 R6, [R5+0x8] ;
        /*0040*/               @P0 BRA `(.L_x_4) ;
        /*0050*/                   STL [R1], R4 ;
.L_x_4:
        /*0060*/              @!P1 LDL R7, [R1] ;
        /*0070*/               @P2 BRA P1, `(.L_x_3) ;
.L_x_5:
        /*0080*/                   HGMMA.64x16x8.F32.TF32 R24, gdesc[UR8], R24 ;
        /*0090*/                   BRA `(.L_x_5) ;
"""


def test_kernel_resources_counts_the_first_loop():
    res = load(os.path.join(ROOT, 'benchmarks', 'ops', 'kernel_resources.py'), 'ops_kernel_resources')
    ops = res.count_first_loop(SASS.splitlines())
    assert ops == {'LDS': 2, 'HMMA': 1, 'BRA': 2, 'STL': 1, 'LDL': 1}
    assert res.count_first_loop(SASS.splitlines()[9:]) == {'HGMMA': 1, 'BRA': 1}
    assert res.count_first_loop(SASS.splitlines()[:5]) is None  # a forward branch only: no loop


NCU_DETAILS = """
  k1 (32, 128, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    DRAM Throughput                   %        20.50
    Duration                         us       261.44
    Section: Compute Workload Analysis
    Issue Slots Busy               %        41.58
    Section: Launch Statistics
    Registers Per Thread             register/thread             255
"""
NCU_SASS = """"Kernel Name","k1",
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_long_sb","stall_wait",\
"stall_wait (Not Issued)"
"0x0","      LDG.E R1, desc[UR4][R2.64]","30","4","30","0","7"
"0x10","      FMUL R1, R1, R1","10","40","0","10","0"
"0x20","      @P0 BRA 0x10","5","40","0","5","0"
"0x30","      STG.E desc[UR4][R2.64], R1","8","4","8","0","0"
""".replace('\\\n', '')


def test_ncu_reader_splits_each_kernel_at_its_loop(tmp_path, capsys):
    ncu = load(os.path.join(ROOT, 'benchmarks', 'ops', 'ncu_mesa.py'), 'ops_ncu_mesa')
    (name, rows), = ncu.sass_sections(NCU_SASS)
    parts = ncu.split(rows)
    assert name == 'k1' and [len(v) for v in parts.values()] == [1, 2, 1]
    assert ncu.opcode_summary(parts['loop']) == 'FMUL 67%, BRA 33%'
    assert ncu.stall_summary(rows) == 'long_sb 72%, wait 28%'  # the not-issued column is a subset: not counted
    assert list(ncu.split(rows[:1])) == ['no loop']
    (tmp_path / 'd.txt').write_text(NCU_DETAILS)
    (tmp_path / 's.csv').write_text(NCU_SASS)
    ncu.read(str(tmp_path / 'd.txt'), str(tmp_path / 's.csv'))
    out = capsys.readouterr().out
    assert '| k1 | 261.44 us | 41.58 % | 20.50 % |  | 255 |  |' in out
    assert '| k1 | before the loop | 57% | 4 | long_sb 100% |' in out and '| k1 | loop | 28% | 80 | wait 100% |' in out


class _KernelCall:
    """Stands in for `chunk_cg_kernel[grid]`: checks that a launch gives every argument of the kernel, once."""

    def __init__(self, kernel):
        self.arg_names, self.calls = kernel.arg_names, 0

    def __getitem__(self, grid):
        def run(*args, num_warps, num_stages, **kwargs):
            assert sorted(kwargs) == sorted(self.arg_names[len(args):])
            self.calls += 1
        return run


def test_cg_benchmarks_launch_the_kernel_with_its_arguments(monkeypatch):
    import torch

    from fla_mesa.ops import cg
    parts = load(os.path.join(ROOT, 'benchmarks', 'ops', 'benchmark_cg_parts.py'), 'ops_benchmark_cg_parts')
    kernel = load(os.path.join(ROOT, 'benchmarks', 'ops', 'benchmark_cg_kernel.py'), 'ops_benchmark_cg_kernel')
    fake = _KernelCall(cg.chunk_cg_kernel)
    monkeypatch.setattr(parts, 'chunk_cg_kernel', fake)
    monkeypatch.setattr(cg, 'chunk_cg_kernel', fake)
    d = {name: torch.zeros(1) for name in ('k', 'v', 'beta', 'gc', 'h_kk', 'h_kv', 'lamb', 'x', 'o')}
    d['q'] = torch.zeros(1, 1, 1, 64)
    for steps, output in [(0, False), (4, True)]:
        parts.launch(d, steps, True, output, 16, 4)
    kernel.launch(cg, (torch.zeros(1, 64, 1, 64),) + (None,) * 5, 4)
    # bf16 inputs at head dim 64: the states as chunk_mesa stores them there (float16 with column scales)
    from fla_mesa.ops.scaled_states import ScaledStates
    d['h_kk'] = d['h_kv'] = ScaledStates.of(torch.zeros(1, 1, 1, 64, 64))
    parts.launch(d, 4, True, True, 16, 4)
    kernel.launch(cg, (torch.zeros(1, 64, 1, 64, dtype=torch.bfloat16),) + (None,) * 3
                  + (torch.zeros(1, 1, 1, 64, 64), None), 4)
    assert fake.calls == 5


def test_states_benchmark_launches_the_kernel_with_its_arguments(monkeypatch):
    import torch
    bench = load(os.path.join(ROOT, 'benchmarks', 'ops', 'benchmark_states.py'), 'ops_benchmark_states')
    fake = _KernelCall(bench.chunk_states_kernel)
    monkeypatch.setattr(bench, 'chunk_states_kernel', fake)
    k = torch.zeros(1, 64, 1, 64)
    for pair in (True, False):
        for scaled in (True, False):
            outs = bench.stored_outputs(k, pair, scaled)
            assert len(outs) == 1 + pair and (outs[0][1] is not None) == scaled
            bench.launch_stored(k, k, k[..., 0], k[..., 0], outs, pair, scaled, 64, 64, 2, 3)
    assert fake.calls == 4


def test_gla_bwd_benchmark_launches_both_kernels_and_sweeps_the_chosen_configs(monkeypatch):
    import torch

    from fla_mesa.ops import gla_backward
    bench = load(os.path.join(ROOT, 'benchmarks', 'ops', 'benchmark_gla_bwd.py'), 'ops_benchmark_gla_bwd')
    for name in ('gla_bwd_dqkg_kernel', 'gla_bwd_dw_kernel'):
        monkeypatch.setattr(gla_backward, name, _KernelCall(getattr(gla_backward, name)))
    d = {name: torch.zeros(1) for name in ('k', 'v', 'beta', 'do', 'u', 'h', 'dh', 'gc')}
    d['x'] = torch.zeros(1, 64, 1, 64)
    for kernel, side in [('dqkg', 'S'), ('dqkg', 'H'), ('dw', 'S'), ('dw', 'H')]:
        d['v'] = d['k'] = torch.zeros(1, 64, 1, 64)
        bench.launch(kernel, d, side, 64, 32, 4, 2)
    assert gla_backward.gla_bwd_dqkg_kernel.calls == gla_backward.gla_bwd_dw_kernel.calls == 2
    for D in (128, 64):
        for cfg in gla_backward.launch_configs(D, D):
            assert (cfg['BK'], cfg['BV'], cfg['num_warps'], cfg['num_stages']) in bench.configs(D)


def test_gla_bwd_benchmark_launches_the_fused_kernels(monkeypatch):
    import torch

    from fla_mesa.ops import mesa_backward
    from fla_mesa.ops.scaled_states import ScaledStates
    bench = load(os.path.join(ROOT, 'benchmarks', 'ops', 'benchmark_gla_bwd.py'), 'ops_benchmark_gla_bwd')
    names = ('mesa_bwd_dk_kernel', 'mesa_bwd_dw_kernel')
    for name in names:
        monkeypatch.setattr(mesa_backward, name, _KernelCall(getattr(mesa_backward, name)))
    t = torch.zeros(1, 64, 1, 64)
    d = dict(x=t, u=t, k=t.bfloat16(), v=t.bfloat16(), do=t.bfloat16(), beta=t[..., 0], gc=t[..., 0],
             lamb=torch.ones(1, 64), h=ScaledStates.of(torch.zeros(1, 1, 1, 64, 64)))
    d['dh'] = d['h']
    for kernel in ('dk', 'dw'):
        bench.launch_fused(kernel, d)
    assert all(getattr(mesa_backward, name).calls == 1 for name in names)
