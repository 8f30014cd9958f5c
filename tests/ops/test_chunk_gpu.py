"""chunk_mesa's Triton path (CUDA) against the float64 references. Run on a GPU: pytest -m gpu."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from mesa_inputs import grads_on, make_inputs, rel, spread_errors

from fla_mesa.ops import chunk_mesa, naive_recurrent_mesa

pytestmark = pytest.mark.gpu

# fla's chunk primitives (and our CG kernel) take fp32 operands as tf32, unit roundoff 2^-11: errors of a
# few units of it are what fp32 inputs can get on the GPU (fla's own MesaNet backward: 0.7e-3 to 1.9e-3).
# Under TRITON_F32_DEFAULT=ieee every tl.dot of those kernels multiplies in full fp32, and 1e-3 must hold
# (test_fp32_under_ieee runs the ill-conditioned case so: a process of its own, compiling every kernel anew).
IEEE = os.environ.get('TRITON_F32_DEFAULT') == 'ieee'
FP32_GPU = 1e-3 if IEEE else 4 * 2 ** -11


def cuda(*ts):
    return [None if t is None else (tuple(x.cuda() for x in t) if isinstance(t, tuple) else t.cuda()) for t in ts]


def grads_of(fn, q, k, v, g, beta, lamb, state, cot, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta, lamb)]
    st = None if state is None else tuple(s.detach().clone().requires_grad_() for s in state)
    o, (h_kk, h_kv) = fn(*leaves, initial_state=st, output_final_state=True, **kw)
    loss = sum((t * c.to(t)).sum() for t, c in zip((o, h_kk, h_kv), cot))
    wrt = leaves + ([] if st is None else list(st))
    return o, (h_kk, h_kv), torch.autograd.grad(loss, wrt)


def grad_errors(grads, g_ref):
    """{'dq': ..., 'dh_kv0': ...}: `grads_of`'s gradients' relative errors against the reference's, dg's against the
    norms of dg and dbeta together (dg sums terms of dbeta's size that cancel: its own norm would amplify their
    rounding). Every gradient must be finite."""
    errs = {}
    for name, a, b in zip(['q', 'k', 'v', 'g', 'beta', 'lamb', 'h_kk0', 'h_kv0'], grads, g_ref):
        assert torch.isfinite(a).all(), name
        scale = b.norm() + (g_ref[4].norm() if name == 'g' else 0)
        errs['d' + name] = ((a.double() - b).norm() / scale).item()
    return errs


CASES = [
    dict(B=2, T=200, H=2, K=64, V=64, gate='mid', lamb_range=(0.25, 2.0), initial_state=True),
    dict(B=1, T=130, H=3, K=128, V=128, gate='keep', lamb_range=(0.25, 1.0), initial_state=False),
    # lamb down to 0.01: tf32 rounding, amplified by the conditioning, takes the Jacobi-started run's dk to 5.6e-3
    # (2.8e-6 under ieee, and 1.9e-3 from the zero start), so this case is checked under ieee only
    pytest.param(dict(B=2, T=65, H=2, K=32, V=48, gate='forget', lamb_range=(0.01, 10.0), initial_state=True),
                 marks=pytest.mark.skipif(not IEEE, reason="ill-conditioned: checked by test_fp32_under_ieee")),
    dict(B=1, T=100, H=1, K=256, V=256, gate='mid', lamb_range=(0.5, 2.0), initial_state=True),
    dict(B=1, T=1, H=2, K=64, V=64, gate='mid', lamb_range=(0.5, 2.0), initial_state=True),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: f"T{c['T']}K{c['K']}{c['gate']}")
@pytest.mark.parametrize('cg_init', ['jacobi', 'zero'])
def test_fp32_outputs_states_and_gradients_match_float64(case, cg_init):
    inputs = make_inputs(**case, seed=1)
    gen = torch.Generator().manual_seed(2)
    B, T, H, K, V = (case[n] for n in 'BTHKV')
    cot = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((B, T, H, V), (B, H, K, K), (B, H, K, V))]
    o_ref, s_ref, g_ref = grads_of(naive_recurrent_mesa, *cuda(*inputs), cuda(*cot))
    f32 = [None if t is None else (tuple(x.float() for x in t) if isinstance(t, tuple) else t.float()) for t in inputs]
    o, s, grads = grads_of(chunk_mesa, *cuda(*f32), cuda(*cot), cg_steps=3 * K, cg_init=cg_init)
    errs = {'o': rel(o, o_ref), 'h_kk': rel(s[0], s_ref[0]), 'h_kv': rel(s[1], s_ref[1]), **grad_errors(grads, g_ref)}
    print(f"\n[fp32 {'ieee' if IEEE else 'tf32'}] max {max(errs.values()):.2e}: "
          + ' '.join(f'{n} {e:.1e}' for n, e in errs.items()))
    assert all(e < FP32_GPU for e in errs.values()), errs


@pytest.mark.skipif(IEEE, reason="already under ieee")
def test_fp32_under_ieee():
    env = {**os.environ, 'TRITON_F32_DEFAULT': 'ieee', 'FLA_MESA_TEST_FIRST_CONFIG': '1'}
    run = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-s', '-m', 'gpu',
                          f'{__file__}::test_fp32_outputs_states_and_gradients_match_float64', '-k', 'T65K32forget'],
                         env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_cuda_path_equals_cpu_path_and_iteration_counts():
    q, k, v, g, beta, lamb, state = make_inputs(2, 150, 2, 64, 32, lamb_range=(0.25, 1.0), initial_state=True,
                                                dtype=torch.float32, seed=4)
    o_cpu, s_cpu, it_cpu = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=30, cg_tol=1e-4, initial_state=state,
                                      output_final_state=True, return_cg_iters=True)
    o, s, it = chunk_mesa(*cuda(q, k, v, g, beta, lamb), cg_steps=30, cg_tol=1e-4, initial_state=cuda(state)[0],
                          output_final_state=True, return_cg_iters=True)
    assert rel(o.cpu(), o_cpu) < FP32_GPU and rel(s[0].cpu(), s_cpu[0]) < FP32_GPU
    assert (it.cpu() - it_cpu).abs().float().mean() < 0.5 and int(it.max()) < 30


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_jacobi_preconditioned_cg_on_gpu(dtype):
    """cg_precond='jacobi' on CUDA, with lamb spread over channels (where the preconditioner pays): the CPU path's
    output and iteration counts, fewer iterations than plain CG, and (float32) the exact solve's gradients."""
    q, k, v, g, beta, lamb, state = make_inputs(2, 150, 2, 64, 32, lamb_range=(0.25, 5.0), initial_state=True,
                                                dtype=dtype, seed=6)
    kw = dict(cg_steps=60, cg_tol=1e-4, return_cg_iters=True)
    o_cpu, _, it_cpu = chunk_mesa(q, k, v, g, beta, lamb, initial_state=state, cg_precond='jacobi', **kw)
    args = cuda(q, k, v, g, beta, lamb)
    o, _, it = chunk_mesa(*args, initial_state=cuda(state)[0], cg_precond='jacobi', **kw)
    _, _, it_plain = chunk_mesa(*args, initial_state=cuda(state)[0], **kw)
    assert rel(o.cpu(), o_cpu) < (FP32_GPU if dtype == torch.float32 else 2 * 2 ** -8)
    assert (it.cpu() - it_cpu).abs().float().mean() < 0.5
    assert it.float().mean() < 0.75 * it_plain.float().mean(), (it.float().mean(), it_plain.float().mean())
    if dtype != torch.float32:
        return
    gen = torch.Generator().manual_seed(2)
    cot = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((2, 150, 2, 32), (2, 2, 64, 64),
                                                                         (2, 2, 64, 32))]
    up = [t.double() for t in (q, k, v, g, beta, lamb)] + [tuple(x.double() for x in state)]
    o_ref, _, g_ref = grads_of(naive_recurrent_mesa, *cuda(*up), cuda(*cot))
    o, _, grads = grads_of(chunk_mesa, *cuda(q, k, v, g, beta, lamb, state), cuda(*cot), cg_steps=200,
                           cg_precond='jacobi')
    assert rel(o, o_ref) < FP32_GPU
    errs = grad_errors(grads, g_ref)
    assert all(e < FP32_GPU for e in errs.values()), errs


def per_sequence(fn, cu):
    """`fn` (a float64 reference, which takes no cu_seqlens) run on each packed sequence, as `grads_of` calls it: the
    outputs joined and the final states stacked."""
    def run(q, k, v, g, beta, lamb, initial_state=None, output_final_state=True):
        outs, finals = [], []
        for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            init = None if initial_state is None else tuple(s[n:n + 1] for s in initial_state)
            o, fs = fn(*(t[:, a:b] for t in (q, k, v, g, beta)), lamb, initial_state=init, output_final_state=True)
            outs.append(o)
            finals.append(fs)
        return torch.cat(outs, 1), tuple(torch.cat(f) for f in zip(*finals))
    return run


@settings(max_examples=6, deadline=None, derandomize=True, database=None, print_blob=True)
@given(T=st.integers(1, 300), dtype=st.sampled_from([torch.bfloat16, torch.float16]), varlen=st.booleans(),
       cuts=st.lists(st.floats(0.05, 0.95), min_size=1, max_size=3), gate=st.sampled_from(['keep', 'mid', 'forget']),
       betas=st.sampled_from(['low', 'any', 'high']), lamb_lo=st.sampled_from([0.3, 2.0]), init=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_half_precision_at_head_dim_64_matches_float64(T, dtype, varlen, cuts, gate, betas, lamb_lo, init, seed):
    """bf16 and float16 inputs at K = V = 64, where the forward keeps float16 states and products and the backward
    runs its fused path (the adjoint CG forming S_t do_t from do, `mesa_backward`'s two kernels, float16 state
    gradients), against the float64 exact solve on the same rounded inputs and cotangents: the output, the final
    states and every gradient within the storage's rounding (2^-8 for bf16, 2^-11 for float16) plus a few units of
    the 11-bit products (4 * 2^-11), as FP32_GPU allows tf32; T over chunk boundaries, varlen, gates and beta at
    both ends, lamb over a decade."""
    bounds = sorted({0, T, *(int(c * T) for c in cuts)}) if varlen else [0, T]
    N, B, H = len(bounds) - 1, 1 if varlen else 2, 2
    q, k, v, g, beta, lamb, _ = make_inputs(B, T, H, 64, 64, gate=gate, beta_range=betas,
                                            lamb_range=(lamb_lo, 10 * lamb_lo), dtype=dtype, seed=seed)
    state = make_inputs(max(N, B), 1, H, 64, 64, initial_state=True, seed=seed + 1)[-1] if init else None
    state = None if state is None else tuple(s.float() for s in state)
    gen = torch.Generator().manual_seed(seed)
    # cotangents as the half dtype holds them, so that their rounding is no error of ours
    cot = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).double()
           for s in ((B, T, H, 64), (max(N, B), H, 64, 64), (max(N, B), H, 64, 64))]
    up = [t.double() for t in (q, k, v, g, beta, lamb)] + [None if state is None else tuple(x.double() for x in state)]
    if varlen:
        cu = torch.tensor(bounds)
        o_ref, s_ref, g_ref = grads_of(per_sequence(naive_recurrent_mesa, cu), *cuda(*up), cuda(*cot))
        o, s, grads = grads_of(chunk_mesa, *cuda(q, k, v, g, beta, lamb, state), cuda(*cot), cu_seqlens=cu.cuda())
    else:
        o_ref, s_ref, g_ref = grads_of(naive_recurrent_mesa, *cuda(*up), cuda(*cot))
        o, s, grads = grads_of(chunk_mesa, *cuda(q, k, v, g, beta, lamb, state), cuda(*cot))
    errs = {'o': rel(o, o_ref), 'h_kk': rel(s[0], s_ref[0]), 'h_kv': rel(s[1], s_ref[1]), **grad_errors(grads, g_ref)}
    bound = (2 ** -8 if dtype == torch.bfloat16 else 2 ** -11) + 4 * 2 ** -11
    print(f"\n[{dtype} T={T} {bounds} {gate} {betas} lamb {lamb_lo} init {init}] max {max(errs.values()):.2e} "
          f"(bound {bound:.2e}): " + ' '.join(f'{n} {e:.1e}' for n, e in errs.items()))
    assert all(e < bound for e in errs.values()), errs


def test_varlen_and_two_pieces_on_gpu():
    lengths = [1, 63, 64, 65, 130]
    cu = torch.tensor([0] + lengths).cumsum(0).cuda()
    q, k, v, g, beta, lamb, _ = cuda(*make_inputs(1, sum(lengths), 2, 64, 64, dtype=torch.float32, seed=5))
    o, s = chunk_mesa(q, k, v, g, beta, lamb, cu_seqlens=cu, output_final_state=True)
    for n in range(len(lengths)):
        a, b = cu[n].item(), cu[n + 1].item()
        o_n, s_n = chunk_mesa(*(x[:, a:b] for x in (q, k, v, g, beta)), lamb, output_final_state=True)
        # tf32 products are not bitwise reproducible across fla's autotuned tilings of the two layouts
        assert rel(o[:, a:b], o_n) < FP32_GPU and rel(s[0][n], s_n[0][0]) < FP32_GPU
        assert rel(s[1][n], s_n[1][0]) < FP32_GPU
    t = 100
    o1, s1 = chunk_mesa(*(x[:, :t] for x in (q, k, v, g, beta)), lamb, output_final_state=True)
    o2, s2 = chunk_mesa(*(x[:, t:] for x in (q, k, v, g, beta)), lamb, initial_state=s1, output_final_state=True)
    o_all, s_all = chunk_mesa(q, k, v, g, beta, lamb, output_final_state=True)
    assert rel(torch.cat([o1, o2], 1), o_all) < FP32_GPU and rel(s2[0], s_all[0]) < FP32_GPU


def test_zero_steps_is_fla_simple_gla():
    """cg_steps=0 is GLA with x = q; our products take float32 operands, so fla's reference gets the same values."""
    from fla.ops.simple_gla import chunk_simple_gla
    q, k, v, g, beta, lamb, state = cuda(*make_inputs(2, 300, 2, 64, 64, dtype=torch.bfloat16, initial_state=True))
    o, (_, h_kv) = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=0, initial_state=state, output_final_state=True)
    o_ref, s_ref = chunk_simple_gla(q.float(), k.float(), v.float() * beta[..., None], g, scale=1.0,
                                    initial_state=state[1], output_final_state=True)
    assert rel(o, o_ref) < 2 ** -8 and rel(h_kv, s_ref) < FP32_GPU


def test_forward_without_grad_writes_no_x(monkeypatch):
    """Under no_grad, or with no input requiring grad, nothing will read x: the CG kernel does not write it, for the
    same output bit for bit."""
    import fla_mesa.ops.chunk as chunk_module
    solve, seen = chunk_module.chunk_cg_solve, []
    monkeypatch.setattr(chunk_module, 'chunk_cg_solve',
                        lambda *a, **kw: seen.append(kw.get('store_x', True)) or solve(*a, **kw))
    q, k, v, g, beta, lamb, _ = cuda(*make_inputs(2, 300, 2, 64, 64, dtype=torch.bfloat16, seed=6))
    leaves = [t.requires_grad_() for t in (q, k, v, g, beta, lamb)]
    o = chunk_mesa(*leaves)[0]
    with torch.no_grad():
        o_no_grad = chunk_mesa(*leaves)[0]
    o_plain = chunk_mesa(*(t.detach() for t in leaves))[0]
    assert seen == [True, False, False] and torch.equal(o_no_grad, o) and torch.equal(o_plain, o)
    o.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize('D', [64, 128])
@pytest.mark.parametrize('lamb_value', [0.25, 1.0])
def test_bf16_error_no_worse_than_fla(D, lamb_value):
    """At 30 CG steps our bf16 output is at least as close to the float64 exact solve as fla's chunk_mesa_net."""
    from fla.ops.mesa_net import chunk_mesa_net
    B, T, H = 2, 512, 4
    q, k, v, g, beta, _, _ = make_inputs(B, T, H, D, D, gate='keep', beta_range='any', dtype=torch.bfloat16, seed=9)
    q, k, v, g, beta = cuda(q, k, v, g, beta)
    lamb = torch.full((H, D), lamb_value, device='cuda')
    o_ref, _ = naive_recurrent_mesa(*(t.double() for t in (q, k, v, g, beta, lamb)))
    o, _ = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=30)
    o_fla, _, _ = chunk_mesa_net(q, k, v, g, beta, lamb, max_CG_iteration=30)
    ours, fla = rel(o, o_ref), rel(o_fla, o_ref)
    print(f"D={D} lamb={lamb_value}: ours {ours:.2e} fla {fla:.2e} floor {rel(o_ref.bfloat16(), o_ref):.2e}")
    assert ours <= fla


@pytest.mark.parametrize('K', [64, 128])
def test_bf16_small_value_channels_and_tokens_keep_their_precision(K):
    """The CG kernel's float16 products scale the output pass per token and per value channel: value channels from
    1e-6 to 1e2 and tokens whose outputs are 1e-6 times their chunk's others keep the output's bf16 rounding (2^-8)
    plus a few units of the products' 2^-11, relative to ||G_t|| ||x_t||. One scale per tile gave errors of 0.1 to 1
    there (RESULTS, nineteenth session)."""
    by_token, by_channel = spread_errors(torch.bfloat16, 'cuda', K=K, V=K)
    print(f"\n[K={K}] worst token {by_token:.2e}, worst channel {by_channel:.2e}")
    assert by_token < 2 ** -8 + 4 * 2 ** -11 and by_channel < 2 ** -8 + 4 * 2 ** -11


def long_sequence(seed, lamb_value, B=1, T=2048, H=4, D=128, device='cuda'):
    """The op benchmark's inputs on one long sequence: bf16 q, k (L2-normalised) and v, g = logsigmoid(N(4, 1))
    (gamma mostly in (0.95, 1)), beta = sigmoid(N(0, 1)), lamb filled with `lamb_value`; and an output gradient."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k = (F.normalize(torch.randn(B, T, H, D, device=device, generator=gen), dim=-1).bfloat16() for _ in range(2))
    v = torch.randn(B, T, H, D, device=device, generator=gen).bfloat16()
    g = F.logsigmoid(torch.randn(B, T, H, device=device, generator=gen) + 4.0)
    beta = torch.sigmoid(torch.randn(B, T, H, device=device, generator=gen))
    lamb = torch.full((H, D), float(lamb_value), device=device)
    return [q, k, v, g, beta, lamb], torch.randn(B, T, H, D, device=device, generator=gen)


def test_bf16_gradients_no_worse_than_fla():
    """Every gradient of our bf16 forward+backward (float32 operands in the backward's GLA passes, the default) is at
    least as close to the float64 exact solve's as fla's chunk_mesa_net's, and at least as close as with bf16
    operands. D=128 only: on a fresh machine fla's backward autotunes for minutes at D=64 (benchmark_mesa.py's
    `--parts gradients` measures both)."""
    from fla.ops.mesa_net import chunk_mesa_net
    inputs, do = long_sequence(seed=3, lamb_value=1.0)
    ref = grads_on(naive_recurrent_mesa, inputs, do, torch.float64)[0][1:]

    def errs(fn):
        return [rel(a, b) for a, b in zip(grads_on(fn, inputs, do)[0][1:], ref)]
    ours = errs(lambda *a: chunk_mesa(*a, cg_steps=30))
    bf16_ops = errs(lambda *a: chunk_mesa(*a, cg_steps=30, fp32_backward=False))
    fla = errs(lambda *a: chunk_mesa_net(*a, max_CG_iteration=30))
    print('\n' + '\n'.join(f"d{n}: ours {a:.2e} bf16 operands {b:.2e} fla {c:.2e}"
                           for n, a, b, c in zip(['q', 'k', 'v', 'g', 'beta', 'lamb'], ours, bf16_ops, fla)))
    assert all(a <= c for a, c in zip(ours, fla)) and all(a <= b for a, b in zip(ours, bf16_ops))


def test_tf32_floor_changes_no_digit_and_saves_iterations(monkeypatch):
    """Without `cg_tol` the kernel stops at `TF32_FLOOR` (2^-16), not at float32's eps: on an ill-conditioned bf16
    input (lamb 0.05, gamma near 1) the output and every gradient stay within 1% of the float64-solve error they have
    with the eps floor, in at least 15% fewer iterations. (2^-14 misses the 1% on dg, 2^-12 on every gradient.)"""
    import fla_mesa.ops.cg as cg
    inputs, do = long_sequence(seed=1, lamb_value=0.05)
    ref, _ = grads_on(naive_recurrent_mesa, inputs, do, torch.float64)

    def errors():
        out, (_, iters) = grads_on(lambda *a: chunk_mesa(*a, cg_steps=30, return_cg_iters=True), inputs, do)
        return [rel(a, b) for a, b in zip(out, ref)], iters.float().mean().item()
    tf32, it_tf32 = errors()
    monkeypatch.setattr(cg, 'TF32_FLOOR', torch.finfo(torch.float32).eps)
    full, it_full = errors()
    print(f"\niterations {it_tf32:.2f} (2^-16) against {it_full:.2f} (eps); errors "
          + ' '.join(f'{n} {a:.4e}/{b:.4e}' for n, a, b in zip(['o', 'dq', 'dk', 'dv', 'dg', 'dbeta', 'dlamb'],
                                                                 tf32, full)))
    assert it_tf32 < 0.85 * it_full
    assert all(a <= 1.01 * b for a, b in zip(tf32, full)), (tf32, full)


def test_ill_conditioned_inputs_stay_finite():
    """Repeated keys (H_t a sum of identical outer products), gamma ~ 1, lamb = 0.01, bf16."""
    B, T, H, K = 1, 512, 2, 64
    q, k, v, g, beta, _, _ = make_inputs(B, T, H, K, K, gate='keep', beta_range='high', dtype=torch.bfloat16)
    k = k[:, :1].expand_as(k).contiguous()
    lamb = torch.full((H, K), 0.01)
    leaves = [t.cuda().requires_grad_() for t in (q, k, v, g, beta, lamb)]
    for tol in (None, 1e-4):
        o, _ = chunk_mesa(*leaves, cg_steps=30, cg_tol=tol)
        grads = torch.autograd.grad(o.float().square().sum(), leaves)
        assert torch.isfinite(o).all() and all(torch.isfinite(gr).all() for gr in grads)
