"""The Triton CG kernel (with its fused output pass), the chunk-state kernel and the backward's elementwise kernels,
run by Triton's interpreter on the CPU, against their PyTorch twins; the backward's GLA gradient kernels (and
`mesa_backward`'s) against float64 autograd; and the CUDA forward and backward as composed (fla's GLA backward
primitives, which the interpreter cannot run, replaced by PyTorch twins) against float64.

The interpreter must be switched on before triton is imported, so the comparison runs in a subprocess.
"""

import os
import subprocess
import sys
import textwrap


def run_in_interpreter(script):
    """Runs `script` in a fresh process with Triton's interpreter on; it prints OK last when every check held."""
    # the scripts import this folder's helpers (mesa_inputs)
    path = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)), os.environ.get('PYTHONPATH')]))
    env = dict(os.environ, TRITON_INTERPRET='1', FLA_CACHE_RESULTS='0', PYTHONPATH=path)
    res = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith('OK'), res.stdout + res.stderr


# the scripts that run fla's autotuned kernels (its cumsum): no device to time their configurations on
FLA_PRELUDE = '''
    import torch
    from triton.runtime import autotuner
    autotuner.Autotuner._bench = lambda self, *a, config=None, **k: [0.0, 0.0, 0.0]

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()
'''

SCRIPT = textwrap.dedent('''
    import math, torch
    from fla_mesa.ops.cg import chunk_cg_solve, torch_chunk_cg_solve
    from fla_mesa.ops.scaled_states import ScaledStates
    from fla_mesa.ops.states import (chunk_state_grads_bwd, chunk_state_grads_pair_bwd, chunk_state_pair_fwd,
                                     chunk_states_fwd)
    from fla_mesa.ops.torch_chunk import chunk_cumsum, chunk_output, chunk_states, pad_to_chunks
    from mesa_inputs import state_grads_reference

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    torch.manual_seed(0)
    # K = 128 splits a chunk of 64 over four programs; K = 136 takes the wide-head PyTorch fallback
    for B, T, H, K, lamb_lo, varlen, C in [(2, 40, 2, 32, 0.05, False, 16), (1, 50, 1, 20, 0.5, True, 16),
                                           (1, 150, 1, 128, 0.3, True, 64), (2, 70, 1, 136, 0.3, False, 64),
                                           (1, 90, 1, 136, 0.3, True, 32)]:
        q = torch.randn(B, T, H, K)
        k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1).bfloat16().float()
        v = torch.randn(B, T, H, 48)
        g, beta = -torch.rand(B, T, H) * 0.2, torch.rand(B, T, H)
        lamb = torch.rand(H, K) + lamb_lo
        bounds = [0, 17, 33, T] if varlen else [0, T]
        cu = torch.tensor(bounds) if varlen else None
        # per-sequence chunking: pad every sequence to whole chunks for the PyTorch twin
        pieces = [[pad_to_chunks(x[:, s:e], C) for x in (q, k, g, beta, v)] for s, e in zip(bounds, bounds[1:])]
        gcs = [chunk_cumsum(p[2], C) for p in pieces]
        r0 = torch.randn(len(bounds) - 1 if varlen else B, H, K, K)
        h0 = r0 @ r0.transpose(-1, -2) / K  # an initial H: symmetric positive semi-definite
        hs, hts = zip(*[chunk_states(p[1], p[3][..., None] * p[1], gc, h0[i:i + 1] if varlen else h0, C)
                        for i, (p, gc) in enumerate(zip(pieces, gcs))])
        hvs = [chunk_states(p[1], p[3][..., None] * p[4], gc, None, C)[0] for p, gc in zip(pieces, gcs)]
        gc2 = torch.cat([gc[:, :e - s] for gc, s, e in zip(gcs, bounds, bounds[1:])], 1) / math.log(2)
        h = torch.cat(hs, 1).contiguous()
        idx = None
        if varlen:
            idx = torch.tensor([[n, i] for n, (s, e) in enumerate(zip(bounds, bounds[1:])) for i in range(-(-(e - s) // C))])
        # the state kernel: H's states from bf16 keys, with an initial state, and the final state
        h1, ht1 = chunk_states_fwd(k.bfloat16(), k.bfloat16(), beta, gc2.contiguous(), h0, True, cu, idx, C)
        assert rel(h1, h) < 1e-5 and rel(ht1, torch.cat(hts, 0)) < 1e-5, (rel(h1, h), rel(ht1, torch.cat(hts, 0)))
        hv1, _ = chunk_states_fwd(k, v, beta, gc2.contiguous(), None, False, cu, idx, C)
        hv = torch.cat(hvs, 1)
        assert rel(hv1, hv) < 1e-5, rel(hv1, hv)
        if K <= 64:  # stored in float16 with a power of two per column: each entry within float16's rounding of its
            # column's largest (the interpreter rounds toward zero: 2^-10), the final state as before
            for (sc, ht2), ref, ht_ref in [(chunk_states_fwd(k.bfloat16(), k.bfloat16(), beta, gc2.contiguous(), h0,
                                                             True, cu, idx, C, scaled=True), h1, ht1),
                                           (chunk_states_fwd(k, v, beta, gc2.contiguous(), None, False, cu, idx, C,
                                                             scaled=True), hv1, None)]:
                assert sc.values.dtype == torch.float16 and torch.equal(sc.scales, torch.exp2(sc.scales.log2().round()))
                col = ref.abs().amax(-2, keepdim=True)
                err = ((sc.float() - ref).abs() / torch.where(col > 0, col, 1.)).max().item()
                assert err <= 2 ** -10 and (ht_ref is None or torch.equal(ht2, ht_ref)), err
            # both scans from one launch: each program runs one state's scan, so the pair equals two launches
            vk = torch.randn(B, T, H, K).bfloat16()
            r1 = torch.randn(h0.shape).bfloat16()  # another dtype than h0's: the pair takes both as float32
            for scaled in (False, True):
                one = [chunk_states_fwd(k.bfloat16(), val, beta, gc2.contiguous(), s0, True, cu, idx, C,
                                        scaled=scaled) for val, s0 in ((k.bfloat16(), h0), (vk, r1))]
                pair = chunk_state_pair_fwd(k.bfloat16(), vk, beta, gc2.contiguous(), h0, r1, True, cu, idx, C,
                                            scaled=scaled)
                for (a, at), (b, bt) in zip(one, pair):
                    same = all(torch.equal(x, y) for x, y in zip(a, b)) if scaled else torch.equal(a, b)
                    assert same and torch.equal(at, bt), scaled
            # the reverse scan of the state gradients (query q, output gradient v in bf16), from a final-state
            # gradient, against float64: each entry within float16's rounding of its column's largest, as above
            dht = torch.randn(len(bounds) - 1 if varlen else B, H, K, v.shape[-1])
            ref, ref0 = state_grads_reference(q, v.bfloat16(), gc2, dht, C, bounds if varlen else None)
            for with_dh0 in (True, False):
                dh, dh0 = chunk_state_grads_bwd(q, v.bfloat16(), gc2.contiguous(), dht, with_dh0, cu, idx, C)
                assert dh.values.dtype == torch.float16 and torch.equal(dh.scales, torch.exp2(dh.scales.log2().round()))
                col = ref.abs().amax(-2, keepdim=True)
                err = ((dh.float().double() - ref).abs() / torch.where(col > 0, col, 1.)).max().item()
                assert err <= 2 ** -10, err
                assert dh0 is None if not with_dh0 else rel(dh0.double(), ref0) < 1e-5
                # two passes' scans from one launch (the second output gradient float32, as u): each as its own
                do2, dht2 = torch.randn(v.shape), torch.randn(dht.shape)
                pair = chunk_state_grads_pair_bwd(q, v.bfloat16(), do2, gc2.contiguous(), dht, dht2, with_dh0, cu, idx,
                                                  C)
                for (a, a0), (b, b0) in zip(pair, ((dh, dh0), chunk_state_grads_bwd(
                        q, do2, gc2.contiguous(), dht2, with_dh0, cu, idx, C))):
                    assert torch.equal(a.values, b.values) and torch.equal(a.scales, b.scales)
                    assert a0 is None if not with_dh0 else torch.equal(a0, b0)
        for init, pre, tol in [('jacobi', 'none', None), ('jacobi', 'none', 1e-3), ('zero', 'none', None),
                               ('zero', 'none', 1e-3), ('jacobi', 'jacobi', None), ('zero', 'jacobi', 1e-3)]:
            fused = K <= 128  # the output pass runs in the CG kernel, which takes K <= 128
            x1, i1, o1 = chunk_cg_solve(q, k, beta, gc2.contiguous(), h, lamb, 12, tol, init, True, cu, idx, C,
                                        *((v, hv) if fused else ()), cg_precond=pre)
            outs = [torch_chunk_cg_solve(p[0], p[1], p[3], gc, hh, lamb, 12, tol, init, True, C, pre)
                    for p, gc, hh in zip(pieces, gcs, hs)]
            x2 = torch.cat([o[0][:, :e - s] for o, s, e in zip(outs, bounds, bounds[1:])], 1)
            i2 = torch.cat([o[1][:, :e - s] for o, s, e in zip(outs, bounds, bounds[1:])], 1)
            err = rel(x1, x2)
            mismatch = (i1 != i2).float().mean().item()
            print(B, T, varlen, init, pre, tol, err, mismatch, flush=True)
            assert err < 1e-4, err
            assert mismatch < 0.05, mismatch
            if fused:
                o2 = torch.cat([chunk_output(pad_to_chunks(x1[:, s:e], C), p[1], p[3][..., None] * p[4], hh, gc,
                                             C)[:, :e - s] for p, gc, hh, s, e in
                                zip(pieces, gcs, hvs, bounds, bounds[1:])], 1)
                assert rel(o1, o2) < 1e-5, rel(o1, o2)
        if K <= 64:  # the states as chunk_mesa stores them for bf16 inputs there (float16, a power of two per
            # column): the kernel against the twin on the same states, through the Jacobi start and preconditioner
            sh, shv = ScaledStates.of(h), ScaledStates.of(torch.cat(hvs, 1).contiguous())
            x1, _, o1 = chunk_cg_solve(q, k, beta, gc2.contiguous(), sh, lamb, 12, None, 'jacobi', True, cu, idx, C,
                                        v, shv, cg_precond='jacobi')
            outs = [torch_chunk_cg_solve(p[0], p[1], p[3], gc, ScaledStates.of(hh).float(), lamb, 12, None, 'jacobi',
                                         True, C, 'jacobi') for p, gc, hh in zip(pieces, gcs, hs)]
            x2 = torch.cat([o[0][:, :e - s] for o, s, e in zip(outs, bounds, bounds[1:])], 1)
            o2 = torch.cat([chunk_output(pad_to_chunks(x1[:, s:e], C), p[1], p[3][..., None] * p[4],
                                         ScaledStates.of(hh).float(), gc, C)[:, :e - s] for p, gc, hh, s, e in
                            zip(pieces, gcs, hvs, bounds, bounds[1:])], 1)
            assert rel(x1, x2) < 1e-4 and rel(o1, o2) < 1e-5, (rel(x1, x2), rel(o1, o2))
        if K <= 128:  # cg_steps = 0: x = q and the GLA output
            x0, _, o0 = chunk_cg_solve(q, k, beta, gc2.contiguous(), h, lamb, 0, None, 'jacobi', False, cu, idx, C,
                                       v, hv)
            o2 = torch.cat([chunk_output(p[0], p[1], p[3][..., None] * p[4], hh, gc, C)[:, :e - s]
                            for p, gc, hh, s, e in zip(pieces, gcs, hvs, bounds, bounds[1:])], 1)
            assert torch.equal(x0, q) and rel(o0, o2) < 1e-5, rel(o0, o2)
    print('OK')
''')


def test_triton_cg_kernel_matches_pytorch_in_interpreter():
    run_in_interpreter(SCRIPT)


FP16_SCRIPT = textwrap.dedent('''
    import math, torch
    import fla_mesa.ops.cg as cg
    from fla_mesa.ops.states import chunk_states_fwd
    from fla_mesa.ops.torch_chunk import chunk_cumsum, chunk_states, pad_to_chunks
    from mesa_inputs import exact_solve, worst_token_and_channel
    import triton.language as tl
    # the GPU's float16 products and floor (the interpreter would multiply full float32 operands)
    cg.products_dtype, cg.full_products = (lambda dtype: tl.float16), (lambda: False)
    torch.manual_seed(0)

    def rel(a, b, dim=None):
        return ((a.double() - b).norm(dim=dim) / b.norm(dim=dim)).max().item()

    def check(q, k, v, g, beta, lamb, h0, C=64):
        """x and o of the kernel against the float64 solve and output: norm-wise, and on the worst token and the
        worst value channel, o's error there measured against `exact_solve`'s size of the product o_t = G_t x_t,
        as the dtype bounds it"""
        T = q.shape[1]
        x_ref, o_ref, size = exact_solve(q, k, v, g, beta, lamb, h0)
        gcp = chunk_cumsum(pad_to_chunks(g, C), C)
        kp, bp, vp = (pad_to_chunks(t, C) for t in (k, beta, v))
        h, _ = chunk_states(kp.double(), (bp[..., None] * kp).double(), gcp.double(), h0.double(), C)
        hv, _ = chunk_states(kp.double(), (bp[..., None] * vp).double(), gcp.double(), None, C)
        gc2 = (gcp[:, :T] / math.log(2)).contiguous()
        # the states in float32, and as the state kernel stores them for half-precision inputs at K <= 64: float16
        # with a power of two per column
        scaled = (chunk_states_fwd(k, k, beta, gc2, h0.float().contiguous(), chunk_size=C, scaled=True)[0],
                  chunk_states_fwd(k, v, beta, gc2, chunk_size=C, scaled=True)[0])
        for pre in ('none', 'jacobi'):
            its = []
            for h_kk, h_kv in [(h.float().contiguous(), hv.float().contiguous()), scaled]:
                x, iters, o = cg.chunk_cg_solve(q, k, beta, gc2, h_kk, lamb, 30, None, 'jacobi', True, chunk_size=C,
                                                v=v, h_kv=h_kv, cg_precond=pre)
                errs = rel(x, x_ref), rel(x, x_ref, -1), rel(o, o_ref), *worst_token_and_channel(o, o_ref, size)
                its.append(iters.float().mean().item())
                print(type(h_kk).__name__, pre, 'x', errs[:2], 'o', errs[2:], 'iterations', its[-1], flush=True)
                # 11-bit operands (unit roundoff 2^-11), a few units of it norm-wise and a few more on the worst
                # token or channel
                assert torch.isfinite(x).all() and torch.isfinite(o).all()
                assert errs[0] < 4 * 2 ** -11 and errs[2] < 4 * 2 ** -11, errs
                assert max(errs[1], *errs[3:]) < 16 * 2 ** -11, errs
            # the same start and preconditioner from either storage (diag(H_t) read through the column scales)
            assert abs(its[0] - its[1]) < 0.1, its

    B, T, H, K, V = 1, 100, 2, 32, 48
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    g = -torch.rand(B, T, H) * 0.2
    # scales outside float16's range (6e-5 to 65504): q's rows over 1e-6..1e6, H's initial state and lamb 1e6,
    # v 1e5, beta up to 1e5
    a = torch.randn(B, H, K, K) / K ** 0.5
    check(torch.randn(B, T, H, K) * 10 ** (12 * torch.rand(B, T, H, 1) - 6), k, torch.randn(B, T, H, V) * 1e5, g,
          torch.rand(B, T, H) * 10 ** (5 * torch.rand(B, T, H)), (torch.rand(H, K) + 0.25) * 1e6,
          (a @ a.transpose(-1, -2)) * 1e6)
    # spreads inside one tile: value channels from 1e-7 to 1e2, and the first 20 tokens' beta 1e-7 times the rest's
    # without an initial state (their outputs are 1e-7 times the later tokens')
    early = torch.where(torch.arange(T) < 20, 1e-7, 1.)[None, :, None]
    check(torch.randn(B, T, H, K), k, torch.randn(B, T, H, V) * 10 ** torch.linspace(-7, 2, V), g,
          torch.rand(B, T, H) * early, torch.rand(H, K) + 0.25, torch.zeros(B, H, K, K))

    # the backward's adjoint solve (V = K, float16 states): the kernel forms the right-hand side S_t do_t from the
    # output gradient do. Rows of do over 1e-6..1e6 and value channels from 1e-7 to 1e2: each token's S_t do_t at its
    # own relative precision (against ||S_t|| ||do_t||), then (H_t + diag(lamb))^{-1} S_t do_t as from a given one
    C = 64
    v = torch.randn(B, T, H, K) * 10 ** torch.linspace(-7, 2, K)
    do = torch.randn(B, T, H, K) * 10 ** (12 * torch.rand(B, T, H, 1) - 6)
    beta, lamb = torch.rand(B, T, H), torch.rand(H, K) + 0.25
    s_t = torch.zeros(B, H, K, K, dtype=torch.float64)
    dx_ref, size = torch.empty(B, T, H, K, dtype=torch.float64), torch.empty(B, T, H, dtype=torch.float64)
    for t in range(T):
        s_t = g[:, t, :, None, None].double().exp() * s_t + (beta[:, t, :, None, None] * k[:, t, :, :, None] *
                                                            v[:, t, :, None, :]).double()
        dx_ref[:, t] = (s_t * do[:, t, :, None, :].double()).sum(-1)
        size[:, t] = s_t.norm(dim=(-2, -1)) * do[:, t].double().norm(dim=-1)
    u_ref = exact_solve(dx_ref, k, v, g, beta, lamb)[0]
    gc2 = (chunk_cumsum(pad_to_chunks(g, C), C)[:, :T] / math.log(2)).contiguous()
    h_kk, h_kv = (chunk_states_fwd(k, w, beta, gc2, chunk_size=C, scaled=True)[0] for w in (k, v))
    dx = cg.chunk_cg_solve(do, k, beta, gc2, None, lamb, 0, None, 'jacobi', v=v, h_kv=h_kv, adjoint=True)[0]
    u = cg.chunk_cg_solve(do, k, beta, gc2, h_kk, lamb, 30, None, 'jacobi', v=v, h_kv=h_kv, adjoint=True)[0]
    errs = (rel(dx, dx_ref), ((dx.double() - dx_ref).norm(dim=-1) / size).max().item(), rel(u, u_ref),
            rel(u, u_ref, -1))
    print('adjoint: S_t do_t', errs[:2], 'u', errs[2:], flush=True)
    assert errs[0] < 4 * 2 ** -11 and errs[2] < 4 * 2 ** -11 and max(errs[1], errs[3]) < 16 * 2 ** -11, errs
    print('OK')
''')


def test_float16_products_in_interpreter():
    """The GPU's float16 products (`products_dtype` of half-precision inputs), run exactly by the interpreter, against
    the float64 solve and output, on scales float16 cannot hold unscaled (rows of q from 1e-6 to 1e6, H's states and
    lamb of 1e6, values of 1e5), and on spreads inside one tile (value channels from 1e-7 to 1e2; tokens whose
    outputs are 1e-7 times their chunk's others). The per-tile, per-row and per-column powers of two must keep every
    operand in range, every token and value channel at its own relative precision, and come back out exactly."""
    run_in_interpreter(FP16_SCRIPT)


FORWARD_SCRIPT = textwrap.dedent(FLA_PRELUDE + '''
    import torch.nn.functional as F
    from fla_mesa.ops.chunk import _cuda_fwd
    from fla_mesa.ops import naive_cg_mesa, naive_recurrent_mesa
    torch.manual_seed(0)

    # (T, K, V, cg_steps, lamb lower end, one repeated key, dtype, bound on o's error)
    for T, K, V, steps, lamb_lo, repeat, dtype, bound in [(100, 32, 48, 30, 0.25, False, torch.float32, 1e-5),
                                                          (70, 32, 32, 0, 0.25, False, torch.float32, 1e-5),
                                                          (128, 32, 32, 30, 0.01, True, torch.bfloat16, 4 * 2 ** -9)]:
        q, k = (F.normalize(torch.randn(1, T, 2, K), dim=-1) for _ in range(2))
        if repeat:  # 128 copies of one key, gamma ~ 1, lamb = 0.01: H_t + Lambda is badly conditioned
            k = k[:, :1].expand_as(k).contiguous()
        v = torch.randn(1, T, 2, V)
        g = -torch.rand(1, T, 2) * (0.001 if repeat else 0.3)
        beta, lamb = torch.rand(1, T, 2), torch.rand(2, K) + lamb_lo
        q, k, v = (t.to(dtype) for t in (q, k, v))
        # the first case also with the Jacobi preconditioner: the same converged output
        for pre in (('none', 'jacobi') if T == 100 else ('none',)):
            o, ht_kk, ht_kv, x, iters, _ = _cuda_fwd(q, k, v, g, beta, lamb, None, None, steps, None, 'jacobi', True,
                                                     True, None, None, 64, pre)
            args = [t.double() for t in (q, k, v, g, beta, lamb)]
            o_ref, (hk, hv) = (naive_recurrent_mesa(*args, output_final_state=True) if steps else
                               naive_cg_mesa(*args, cg_steps=0, output_final_state=True))
            errs = rel(o, o_ref), rel(ht_kk, hk), rel(ht_kv, hv)
            print(T, K, V, steps, dtype, pre, errs, flush=True)
            assert o.dtype == dtype and torch.isfinite(o).all()
            assert errs[0] < bound and max(errs[1:]) < 1e-5, errs
            # without a backward to serve, x is not written: the same output, bit for bit
            o_nx, _, _, x_nx, _, _ = _cuda_fwd(q, k, v, g, beta, lamb, None, None, steps, None, 'jacobi', False,
                                               True, None, None, 64, pre, save_x=False)
            assert x_nx is None and torch.equal(o_nx, o)
        assert steps > 0 or (torch.equal(x, q.float()) and iters.eq(0).all())
        if steps == 0:  # without a final state, H's states are not computed at all: the same output
            o_no_state = _cuda_fwd(q, k, v, g, beta, lamb, None, None, 0, None, 'jacobi', False, False, None, None,
                                   64, 'none')[0]
            assert torch.equal(o_no_state, o)
    print('OK')
''')


def test_cuda_forward_matches_float64_in_interpreter():
    """chunk_mesa's whole CUDA forward (fla's cumsum, the state kernel, CG with the fused output pass), run by the
    interpreter on CPU tensors, against the float64 exact solve: outputs and final states, including cg_steps=0 and
    an ill-conditioned bf16 input (the interpreter multiplies in full float32, not tf32)."""
    run_in_interpreter(FORWARD_SCRIPT)


ELEMENTWISE_SCRIPT = textwrap.dedent('''
    import torch
    from fla_mesa.ops.elementwise import bwd_combine, bwd_prep, bwd_solve
    torch.manual_seed(0)

    def close(a, b, dtype):
        # float32 arithmetic, one rounding at the store; Triton's interpreter rounds float32 to bf16 toward zero
        # (the GPU to nearest), so a bf16 result must equal the truncated float32 expression bit for bit
        assert a.dtype == dtype, (a.dtype, dtype)
        if dtype == torch.bfloat16:
            b = (b.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32)
            assert torch.equal(a.float(), b), (a.float() - b).abs().max()
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    # B * T not a multiple of the 32 rows of a program; K = 136 takes two key tiles
    for B, T, H, K, V, dtype, kb_too in [(2, 45, 3, 32, 48, torch.bfloat16, True),
                                         (1, 70, 2, 136, 20, torch.float32, True),
                                         (3, 17, 1, 64, 64, torch.bfloat16, False)]:
        k, x, u, dk_s, dk_h, dkb = (torch.randn(B, T, H, K) for _ in range(6))
        v, dvb = torch.randn(B, T, H, V), torch.randn(B, T, H, V)
        beta = torch.rand(B, T, H)
        k, v, dk_s, dk_h, dkb, dvb = (t.to(dtype) for t in (k, v, dk_s, dk_h, dkb, dvb))
        kb, vb, xq = bwd_prep(k, v, beta, x, kb_too)
        b = beta[..., None]
        close(vb, b * v.float(), dtype)
        close(xq, x, dtype)
        assert (kb is None) != kb_too
        if kb_too:
            close(kb, b * k.float(), dtype)
        dq, dy, dlamb = bwd_solve(u, x, torch.float32, dtype)
        close(dq, u, torch.float32)
        close(dy, -u, dtype)
        torch.testing.assert_close(dlamb, -(u * x).sum((0, 1)), rtol=1e-5, atol=1e-5)
        dq2, none, dlamb2 = bwd_solve(u, x, dtype, None)  # without dy (the float32 backward's)
        assert none is None
        close(dq2, u, dtype)
        torch.testing.assert_close(dlamb2, dlamb, rtol=0, atol=0)
        if not kb_too:
            dk_h = dkb = None
        dk, dv, dbeta = bwd_combine(k, v, beta, dk_s, dk_h, dkb, dvb)
        dk_ref = dk_s.float() + (0 if dkb is None else dk_h.float() + b * dkb.float())
        dbeta_ref = (dvb.float() * v.float()).sum(-1) + (0 if dkb is None else (dkb.float() * k.float()).sum(-1))
        close(dk, dk_ref, dtype)
        close(dv, b * dvb.float(), dtype)
        torch.testing.assert_close(dbeta, dbeta_ref, rtol=1e-5, atol=1e-5)
        print(B, T, H, K, V, dtype, flush=True)
    print('OK')
''')


def test_backward_elementwise_kernels_in_interpreter():
    """The backward's three fused elementwise kernels against their PyTorch expressions: rows not a multiple of a
    program's, keys over two tiles, with and without the H-side gradients."""
    run_in_interpreter(ELEMENTWISE_SCRIPT)


BACKWARD_SCRIPT = textwrap.dedent(FLA_PRELUDE + '''
    import math
    import torch.nn.functional as F
    import fla_mesa.ops.chunk as chunk
    from fla_mesa.ops import naive_recurrent_mesa
    from fla_mesa.ops.torch_chunk import chunk_output, chunk_states, pad_to_chunks
    from mesa_inputs import state_grads_reference
    torch.manual_seed(0)

    def torch_gla_bwd(q, k, v, h, h0, do, dht, g, cu_seqlens, chunk_indices, chunk_size):
        # fla's three GLA backward primitives (which the interpreter cannot run) as autograd through the PyTorch
        # twin, in float32 on the operands as passed; it also checks that the caller's states are the right ones
        B, T, H = g.shape
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        G = (g.detach() * math.log(2)).requires_grad_()  # the chunk-local cumulative gate, natural log
        s0 = None if h0 is None else h0.detach().float().requires_grad_()
        with torch.enable_grad():
            Gp = torch.cat([G, G[:, -1:].expand(B, -T % chunk_size, H)], 1)  # the last chunk's gate continues
            qp, kp, vp = (pad_to_chunks(t, chunk_size) for t in leaves)
            states, ht = chunk_states(kp, vp, Gp, s0, chunk_size)
            assert rel(h, states.detach()) < (1e-5 if v.dtype == torch.float32 else 1e-2), 'wrong states passed'
            loss = (chunk_output(qp, kp, vp, states, Gp, chunk_size)[:, :T] * do.float()).sum()
            if dht is not None:
                loss = loss + (ht * dht.float()).sum()
            grads = torch.autograd.grad(loss, leaves + [G] + ([s0] if s0 is not None else []), allow_unused=True)
        dq, dk, dv, dg = (torch.zeros_like(t) if d is None else d for d, t in zip(grads, leaves + [G]))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(do.dtype), dg, (grads[4] if s0 is not None else None)
    chunk._gla_bwd = torch_gla_bwd

    state_grads = chunk._state_grads

    def torch_state_grads(q, k, v, do, h0, dht, g, cu_seqlens, chunk_size, chunk_indices=None, scaled=False):
        # fla's chunk_bwd_dh (nor can the interpreter run it), in float64: dh[:, c] is the gradient of chunk c's end
        # state, back through the chunks from dht; the last value, that of the initial state. Scaled states take
        # our own reverse scan, as on the GPU
        if scaled:
            return state_grads(q, k, v, do, h0, dht, g, cu_seqlens, chunk_size, chunk_indices, scaled)
        assert cu_seqlens is None
        dh, dh0 = state_grads_reference(q, do, g, dht, chunk_size)
        return dh.float(), (dh0.float() if h0 is not None else None)
    chunk._state_grads = torch_state_grads

    # (T, K, V, dtype, cg_steps, initial state, final-state gradients, fp32_backward, CG preconditioner, bounds on
    # the errors of the gradients in the inputs' dtype and of the float32 ones (g, beta, lamb), float16 states):
    # float32 products here (no tf32); bf16 gradients are rounded toward zero by the interpreter, relative error below
    # 2^-7 (one unit in the last place). The interpreter's full float32 products keep float32 states
    # (`chunk.scaled_states`); the last two cases take the GPU's float16 states for bf16 inputs at K <= 64 (float16's
    # rounding: a few units of 2^-11, on top), with V = K through `mesa_backward`'s kernels and V != K through
    # `gla_backward`'s
    bf16_errs = {}
    scaled_states = chunk.scaled_states
    for T, K, V, dtype, steps, init, final, fp32_bwd, pre, bounds, scaled in [
            (100, 32, 48, torch.float32, 30, True, True, True, 'none', (1e-5, 1e-5), False),
            (100, 32, 48, torch.float32, 30, True, True, True, 'jacobi', (1e-5, 1e-5), False),
            (70, 16, 16, torch.float32, 0, False, True, True, 'none', (1e-5, 1e-5), False),  # H's side only for dht_kk
            (90, 32, 32, torch.bfloat16, 30, False, False, True, 'none', (2 ** -7, 1e-5), False),
            (90, 32, 32, torch.bfloat16, 30, False, False, False, 'none', (3e-2, 3e-2), False),
            (90, 32, 32, torch.bfloat16, 30, True, True, True, 'jacobi', (2 ** -7 + 4 * 2 ** -11, 4 * 2 ** -11), True),
            (90, 32, 48, torch.bfloat16, 30, True, True, True, 'none', (2 ** -7 + 4 * 2 ** -11, 4 * 2 ** -11), True)]:
        chunk.scaled_states = (lambda k: True) if scaled else scaled_states
        B, H = 2, 2
        q, k = (F.normalize(torch.randn(B, T, H, K), dim=-1).to(dtype) for _ in range(2))
        v = torch.randn(B, T, H, V).to(dtype)
        g, beta, lamb = -torch.rand(B, T, H) * 0.3, torch.rand(B, T, H), torch.rand(H, K) + 0.25
        a = torch.randn(B, H, K, K) / K
        h0 = (a @ a.transpose(-1, -2), torch.randn(B, H, K, V)) if init else (None, None)
        do = torch.randn(B, T, H, V)
        dht = (torch.randn(B, H, K, K), torch.randn(B, H, K, V)) if final else (None, None)
        _, _, _, x, _, gc = chunk._cuda_fwd(q, k, v, g, beta, lamb, *h0, steps, None, 'jacobi', False, final, None,
                                            None, 64, pre)
        grads = chunk._cuda_bwd(q, k, v, gc, beta, lamb, *h0, x, do.to(dtype), *dht, steps, None, 'jacobi', fp32_bwd,
                                None, None, 64, pre)
        leaves = [t.double().requires_grad_() for t in (q, k, v, g, beta, lamb)]
        states = [None if s is None else s.double().requires_grad_() for s in h0]
        with torch.enable_grad():
            if steps:
                o, (hk, hv) = naive_recurrent_mesa(*leaves, initial_state=None if not init else tuple(states),
                                                   output_final_state=True)
            else:
                from fla_mesa.ops import naive_cg_mesa
                o, (hk, hv) = naive_cg_mesa(*leaves, cg_steps=0, initial_state=None if not init else tuple(states),
                                            output_final_state=True)
            loss = (o * do.to(dtype).double()).sum()
            if final:
                loss = loss + (hk * dht[0].double()).sum() + (hv * dht[1].double()).sum()
            ref = torch.autograd.grad(loss, leaves + [s for s in states if s is not None], allow_unused=True)
        names = ['q', 'k', 'v', 'g', 'beta', 'lamb'] + (['h_kk0', 'h_kv0'] if init else [])
        ours = list(grads[:6]) + ([grads[6], grads[7]] if init else [])
        if not steps:  # x = q: lamb takes no part
            assert ref[5] is None and not grads[5].any()
            names, ours, ref = names[:5] + names[6:], ours[:5] + ours[6:], ref[:5] + ref[6:]
        errs = {n: rel(a, b) for n, a, b in zip(names, ours, ref)}
        print(T, K, V, dtype, steps, fp32_bwd, scaled, {n: f'{e:.1e}' for n, e in errs.items()}, flush=True)
        assert all(e < bounds[n in ('g', 'beta', 'lamb')] for n, e in errs.items()), errs
        if dtype == torch.bfloat16 and not scaled:
            bf16_errs[fp32_bwd] = errs
    assert all(bf16_errs[True][n] < bf16_errs[False][n] for n in bf16_errs[True]), bf16_errs
    print('OK')
''')


def test_cuda_backward_composition_in_interpreter():
    """chunk_mesa's CUDA backward (fla's cumsum, our state, CG, GLA-gradient, `mesa_backward` and elementwise kernels)
    run by the interpreter on CPU tensors, with fla's GLA backward primitives replaced by PyTorch twins (the
    interpreter cannot run them), against the float64 exact solve's gradients: the composition, the signs and the
    states each pass gets, the cg_steps=0 path with a final-state gradient, and both fp32_backward settings."""
    run_in_interpreter(BACKWARD_SCRIPT)


GLA_BWD_SCRIPT = textwrap.dedent(FLA_PRELUDE + '''
    import math
    from fla.ops.utils import chunk_local_cumsum, prepare_chunk_indices
    from fla.ops.utils.constant import RCP_LN2
    from fla_mesa.ops.gla_backward import chunk_gla_bwd
    from fla_mesa.ops.cg import chunk_cg_solve
    from fla_mesa.ops.mesa_backward import mesa_bwd_dk, mesa_bwd_dw
    from fla_mesa.ops.scaled_states import ScaledStates
    torch.manual_seed(0)

    def as_states(h, scaled, span=30):
        # (what the kernels take, its float32 value): h itself, or float16 values times a power of two per column,
        # from 2^-span to 2^span (the state gradients' narrower: they set dv, which float16 inputs store in float16)
        if not scaled:
            return h, h
        st = ScaledStates(h.half(), torch.exp2(torch.randint(-span, span, h.shape[:3] + h.shape[-1:]).float()))
        return st, st.float()

    def reference(q, k, v, beta, do, h, dh, G, chunks):
        # float64 autograd of sum <o, do> + sum_c <chunk-end state_c, dh_c>, chunk by chunk, the chunk-start states
        # h given (constants); value beta * v, G the natural-log chunk-local cumulative gate
        leaves = [t.double().requires_grad_() for t in (q, k, v, beta, G)]
        q_, k_, v_, b_, G_ = leaves
        loss = 0.
        with torch.enable_grad():
            for b, t0, t1, c in chunks:
                sl = (b, slice(t0, t1))
                qc, kc, wc, Gc = q_[sl], k_[sl], v_[sl] * b_[sl][..., None], G_[sl]
                hc, dhc = h[b, c].double(), dh[b, c].double()
                dec = torch.exp(Gc[:, None] - Gc[None]).permute(2, 0, 1)  # [H, t, s]
                A = torch.einsum('thk,shk->hts', qc, kc) * dec.tril()
                o = torch.einsum('th,thk,hkv->thv', Gc.exp(), qc, hc) + torch.einsum('hts,shv->thv', A, wc)
                end = Gc[-1].exp()[:, None, None] * hc + torch.einsum('sh,shk,shv->hkv', (Gc[-1] - Gc).exp(), kc, wc)
                loss = loss + (o * do[sl].double()).sum() + (end * dhc).sum()
            return torch.autograd.grad(loss, leaves)

    from hypothesis import example, given, settings, strategies as st
    GATES = {'keep': 1e-3, 'mid': 0.3, 'forget': 5.0}     # -g drawn from U(0, this): gamma near 1 ... down to e^-5
    BETAS = {'low': (0., 1e-3), 'any': (0., 1.), 'high': (1 - 1e-3, 1.)}
    # the largest relative error of a gradient stored in dtype (dv; dq, dk, dv of `mesa_backward`'s kernels): the
    # interpreter truncates to bf16 (below one unit in the last place, 2^-7; 17% of random 16-entry tensors exceed
    # round-to-nearest's 2^-8) and rounds to float16
    STORED = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -11}

    def case(B, T, H, K, V, dtype, varlen, C, gate, betas, cuts, scaled, seed):
        # the backward's operands of both passes, their states and state gradients (as the kernels take them), and
        # the float64 gradients of S's pass (output gradient do) and of H's (+u)
        torch.manual_seed(seed)
        B = 1 if varlen else B
        bounds = sorted({0, T, *(int(c * T) for c in cuts)}) if varlen else [0, T]
        cu = torch.tensor(bounds) if varlen else None
        idx = prepare_chunk_indices(cu, C) if varlen else None
        if varlen:
            starts = [(t0, min(t0 + C, e)) for s, e in zip(bounds, bounds[1:]) for t0 in range(s, e, C)]
            chunks = [(0, t0, t1, c) for c, (t0, t1) in enumerate(starts)]
        else:
            chunks = [(b, t0, min(t0 + C, T), i) for b in range(B) for i, t0 in enumerate(range(0, T, C))]
        NT = len(chunks) // B
        x = torch.randn(B, T, H, K)                                   # the solve's x: float32
        k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1).to(dtype)
        v = torch.randn(B, T, H, V).to(dtype)
        lo, hi = BETAS[betas]
        beta = lo + (hi - lo) * torch.rand(B, T, H)
        do = torch.randn(B, T, H, V).to(dtype)
        u = torch.randn(B, T, H, K)                                   # H's side: output gradient -u, float32
        gc = chunk_local_cumsum(-torch.rand(B, T, H) * GATES[gate], chunk_size=C, scale=RCP_LN2, cu_seqlens=cu,
                                chunk_indices=idx)
        h_kv, dh_kv = torch.randn(B, NT, H, K, V), torch.randn(B, NT, H, K, V)
        h_kk, dh_u = torch.randn(B, NT, H, K, K), torch.randn(B, NT, H, K, K)   # dh_u: the state gradients of +u
        (h_kv, h_kv_ref), (h_kk, h_kk_ref) = as_states(h_kv, scaled), as_states(h_kk, scaled)
        (dh_kv, dh_kv_ref), (dh_u, dh_u_ref) = as_states(dh_kv, scaled, 6), as_states(dh_u, scaled, 6)
        G = gc * math.log(2)
        ref_s = reference(x, k.float(), v.float(), beta, do.float(), h_kv_ref, dh_kv_ref, G, chunks)
        ref_h = reference(x, k.float(), k.float(), beta, u, h_kk_ref, dh_u_ref, G, chunks)
        kw = dict(cu_seqlens=cu, chunk_indices=idx, chunk_size=C)
        return (x, k, v, beta, do, u, gc, h_kv, dh_kv, h_kk, dh_u), ref_s, ref_h, kw, bounds

    @settings(max_examples=10, deadline=None, derandomize=True, database=None, print_blob=True)
    @given(B=st.integers(1, 2), T=st.integers(1, 150), H=st.integers(1, 2), K=st.sampled_from([16, 32, 48, 80, 128]),
           V=st.sampled_from([16, 40, 64, 128]), dtype=st.sampled_from(list(STORED)), varlen=st.booleans(),
           C=st.sampled_from([16, 32, 64]), gate=st.sampled_from(list(GATES)), betas=st.sampled_from(list(BETAS)),
           cuts=st.lists(st.floats(0.05, 0.95), max_size=3), scaled=st.booleans(), seed=st.integers(0, 2 ** 16))
    @example(B=2, T=100, H=2, K=32, V=48, dtype=torch.float32, varlen=False, C=64, gate='mid', betas='any', cuts=[],
             scaled=False, seed=0)
    @example(B=1, T=90, H=2, K=80, V=40, dtype=torch.bfloat16, varlen=True, C=32, gate='mid', betas='any',
             cuts=[0.26, 0.57], scaled=False, seed=1)
    @example(B=2, T=70, H=1, K=128, V=128, dtype=torch.bfloat16, varlen=False, C=64, gate='mid', betas='any',
             cuts=[], scaled=False, seed=2)
    @example(B=1, T=100, H=2, K=64, V=48, dtype=torch.bfloat16, varlen=True, C=64, gate='mid', betas='any',
             cuts=[0.4], scaled=True, seed=3)
    def check(B, T, H, K, V, dtype, varlen, C, gate, betas, cuts, scaled, seed):
        ops, ref_s, ref_h, kw, bounds = case(B, T, H, K, V, dtype, varlen, C, gate, betas, cuts, scaled, seed)
        x, k, v, beta, do, u, gc, h_kv, dh_kv, h_kk, dh_u = ops
        B = k.shape[0]
        dq, dv, dk, dg, dbeta = chunk_gla_bwd(x, k, v, beta, do, h_kv, dh_kv, gc, **kw)
        first = {'q': rel(dq, ref_s[0]), 'k': rel(dk, ref_s[1]), 'v': rel(dv.float(), ref_s[2]),
                 'beta': rel(dbeta.sum(0).view(B, T, H), ref_s[3]), 'g': rel(dg.sum(0).view(B, T, H), ref_s[4])}
        # H's side on the same buffers: gradients of -u added, v's (k's) added to dk, and for half-precision k
        # stored in k's dtype in a new tensor, as the backward does
        out = None if dtype == torch.float32 else torch.empty_like(k)
        none, dv2, dk2, dg2, dbeta2 = chunk_gla_bwd(x, k, k, beta, u, h_kk, dh_u, gc, acc=(dk, dk, dg, dbeta),
                                                    negate=True, with_dq=False, dv_out=out, **kw)
        assert none is None and dk2 is dk and dv2 is (dk if out is None else out) and dg2 is dg and dbeta2 is dbeta
        both = {'k': rel(dv2.float(), ref_s[1] - ref_h[1] - ref_h[2]), 'beta': rel(dbeta.sum(0).view(B, T, H),
                ref_s[3] - ref_h[3]), 'g': rel(dg.sum(0).view(B, T, H), ref_s[4] - ref_h[4])}
        print(B, T, H, K, V, dtype, bounds, C, gate, betas, scaled, {n: f'{e:.1e}' for n, e in first.items()},
              {n: f'{e:.1e}' for n, e in both.items()}, flush=True)
        # float32 products here; dv is stored in v's dtype
        assert all(e < (STORED[dtype] if n == 'v' else 1e-5) for n, e in first.items()), first
        assert all(e < (STORED[dtype] if n == 'k' else 1e-5) for n, e in both.items()), both

    check()

    # the backward's kernels at K = V <= 64 with scaled states: dx = S_t do_t from the adjoint CG kernel (its right-hand
    # side, which zero CG steps return), then both passes' gradients together, by two kernels of one program per
    # chunk, with the solve's dq = u (in q's dtype) and dlamb = -sum u * x; lamb spread over three decades
    @settings(max_examples=8, deadline=None, derandomize=True, database=None, print_blob=True)
    @given(B=st.integers(1, 2), T=st.integers(1, 150), H=st.integers(1, 2), K=st.sampled_from([16, 20, 32, 64]),
           dtype=st.sampled_from(list(STORED)), varlen=st.booleans(), C=st.sampled_from([16, 32, 64]),
           gate=st.sampled_from(list(GATES)), betas=st.sampled_from(list(BETAS)),
           cuts=st.lists(st.floats(0.05, 0.95), max_size=3), seed=st.integers(0, 2 ** 16))
    @example(B=1, T=100, H=2, K=64, dtype=torch.bfloat16, varlen=True, C=64, gate='mid', betas='any', cuts=[0.4],
             seed=3)
    @example(B=1, T=1, H=1, K=16, dtype=torch.bfloat16, varlen=False, C=16, gate='mid', betas='any', cuts=[], seed=9)
    def check_fused(B, T, H, K, dtype, varlen, C, gate, betas, cuts, seed):
        ops, ref_s, ref_h, kw, bounds = case(B, T, H, K, K, dtype, varlen, C, gate, betas, cuts, True, seed)
        x, k, v, beta, do, u, gc, h_kv, dh_kv, h_kk, dh_u = ops
        lamb = torch.exp(torch.empty(x.shape[2], K).uniform_(-5, 2))           # 0.007 to 7.4
        dx = chunk_cg_solve(do, k, beta, gc, None, lamb, 0, None, 'jacobi', v=v, h_kv=h_kv, adjoint=True, **kw)[0]
        dk_key, dg = mesa_bwd_dk(x, k, v, beta, do, u, lamb, h_kk, h_kv, dh_u, dh_kv, gc, **kw)
        dq, dk, dv, dbeta, dlamb = mesa_bwd_dw(k, x, k, v, beta, do, u, dh_u, dh_kv, gc, dk_key, **kw)
        assert dq.dtype == dk.dtype == dv.dtype == dtype
        # the gate's gradient takes x . dq, dq the query's gradient of both passes, as x . diag(lamb) u (what it is
        # when u solves the adjoint system; here x and u are random)
        x_dq = (x.double() * (ref_s[0] - ref_h[0])).sum(-1)
        dG = ref_s[4] - ref_h[4] - x_dq + (x.double() * lamb.double() * u.double()).sum(-1)
        # the kernel's dg is g's gradient: dG (the chunk-local cumulative gate's) summed from each chunk's end
        dg_ref = torch.empty_like(dG)
        for s, e in zip(bounds, bounds[1:]):
            for t0 in range(s, e, C):
                dg_ref[:, t0:min(t0 + C, e)] = dG[:, t0:min(t0 + C, e)].flip(1).cumsum(1).flip(1)
        errs = {'x': rel(dx, ref_s[0]), 'q': rel(dq.float(), u.double()), 'k': rel(dk.float(), ref_s[1] - ref_h[1] -
                ref_h[2]), 'v': rel(dv.float(), ref_s[2]), 'g': rel(dg, dg_ref),
                'beta': rel(dbeta, ref_s[3] - ref_h[3]), 'lamb': rel(dlamb, -(u.double() * x).sum((0, 1)))}
        print(x.shape, dtype, bounds, C, gate, betas, {n: f'{e:.1e}' for n, e in errs.items()}, flush=True)
        assert all(e < (STORED[dtype] if n in ('q', 'k', 'v') else 1e-5) for n, e in errs.items()), errs

    check_fused()
    print('OK')
''')


def test_gla_backward_kernels_in_interpreter():
    """The backward's per-chunk GLA gradient kernels against float64 autograd of the chunk equations, given the
    states and state gradients, on hypothesis-drawn cases: float32, bf16 and float16 operands, T from 1 and not a
    multiple of the chunk, chunks of 16-64, varlen with up to four sequences, K and V of one or two tiles and unequal,
    gates near 1 to e^-5 a token, beta near 0 and near 1, states in float32 or float16 with a power of two per column
    (`ScaledStates`); then H's side (gradients of -u) added in place onto S's buffers, k's gradient stored in k's
    dtype. Then `mesa_backward`'s kernels (K = V <= 64, float16 states) on such cases: dx alone, and both sides'
    gradients together, the gate's with x . dq taken as x . diag(lamb) u, lamb over three decades."""
    run_in_interpreter(GLA_BWD_SCRIPT)
