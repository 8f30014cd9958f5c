"""chunk_mesa on the PyTorch path against the float64 references."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from mesa_inputs import BETA_RANGES, GATE_RANGES, make_inputs, rel, shapes, spread_errors

from fla_mesa.ops import chunk_mesa, naive_cg_mesa, naive_recurrent_mesa

# float64 agreement: what is left after CG has converged is rounding amplified by the condition number
EXACT = 1e-8


def converged_steps(K):
    return 3 * K + 10


def run_with_grads(fn, q, k, v, g, beta, lamb, state, seed=1, **kw):
    """Output, final state and gradients of every input for a fixed random cotangent."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, beta, lamb)]
    st_leaves = None if state is None else tuple(s.clone().requires_grad_() for s in state)
    o, (h_kk, h_kv) = fn(*leaves, initial_state=st_leaves, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in (o, h_kk, h_kv)]
    loss = sum((t * c).sum() for t, c in zip((o, h_kk, h_kv), cot))
    wrt = leaves + ([] if st_leaves is None else list(st_leaves))
    return o, (h_kk, h_kv), torch.autograd.grad(loss, wrt)


@settings(max_examples=30)
@given(shape=shapes(), gate=st.sampled_from(sorted(GATE_RANGES)), beta_range=st.sampled_from(sorted(BETA_RANGES)),
       lamb_lo=st.sampled_from([1e-2, 0.1, 1.0]), lamb_hi=st.sampled_from([1.0, 10.0]),
       with_state=st.booleans(), chunk_size=st.sampled_from([16, 32]), cg_init=st.sampled_from(['jacobi', 'zero']),
       cg_precond=st.sampled_from(['none', 'jacobi']), seed=st.integers(0, 2 ** 16))
def test_matches_exact_solve(shape, gate, beta_range, lamb_lo, lamb_hi, with_state, chunk_size, cg_init, cg_precond,
                             seed):
    inputs = make_inputs(**shape, gate=gate, beta_range=beta_range, lamb_range=(lamb_lo, lamb_hi),
                         initial_state=with_state, seed=seed)
    o, s, grads = run_with_grads(chunk_mesa, *inputs, cg_steps=converged_steps(shape['K']), cg_init=cg_init,
                                 chunk_size=chunk_size, cg_precond=cg_precond)
    o_ref, s_ref, grads_ref = run_with_grads(naive_recurrent_mesa, *inputs)
    assert rel(o, o_ref) < EXACT
    assert rel(s[0], s_ref[0]) < EXACT and rel(s[1], s_ref[1]) < EXACT
    assert_grads_close(grads, grads_ref)


def assert_grads_close(grads, grads_ref):
    names = ['q', 'k', 'v', 'g', 'beta', 'lamb', 'h_kk0', 'h_kv0']
    for name, a, b in zip(names, grads, grads_ref):
        if name == 'g':
            # the chunked dg is a reverse cumsum of terms of the size of the beta-gradient terms that cancel
            # to a tiny dg when the gate forgets (g ~ -20): its rounding is relative to that size
            scale = b.norm() + grads_ref[4].norm()
            assert ((a - b).norm() / scale).item() < EXACT, name
        else:
            assert rel(a, b) < EXACT, name


@settings(max_examples=30)
@given(shape=shapes(max_T=40), cg_steps=st.integers(0, 4), cg_init=st.sampled_from(['jacobi', 'zero']),
       cg_precond=st.sampled_from(['none', 'jacobi']), with_state=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_each_cg_step_matches_reference(shape, cg_steps, cg_init, cg_precond, with_state, seed):
    """Unconverged CG is the same algorithm step for step (start, preconditioner, updates, guards)."""
    q, k, v, g, beta, lamb, state = make_inputs(**shape, lamb_range=(0.05, 2.0), initial_state=with_state, seed=seed)
    o, _ = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=cg_steps, cg_init=cg_init, initial_state=state, chunk_size=16,
                      cg_precond=cg_precond)
    if cg_steps == 0:  # gated linear attention: x = q, whatever the start
        o_ref, _ = naive_cg_mesa(q, k, v, g, beta, lamb, cg_steps=0, initial_state=state)
    else:
        o_ref, _ = naive_cg_mesa(q, k, v, g, beta, lamb, cg_steps=cg_steps, cg_init=cg_init, initial_state=state,
                                 cg_precond=cg_precond)
    assert rel(o, o_ref) < 1e-10


def test_zero_steps_is_gated_linear_attention():
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    q, k, v, g, beta, lamb, state = make_inputs(2, 50, 2, 8, 8, dtype=torch.float32, initial_state=True)
    o, (_, h_kv) = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=0, initial_state=state, output_final_state=True,
                              chunk_size=16)
    o_ref, s_ref = naive_recurrent_simple_gla(q, k, v * beta[..., None], g, scale=1.0, initial_state=state[1])
    assert rel(o, o_ref) < 1e-5 and rel(h_kv, s_ref) < 1e-5


def test_gradcheck():
    q, k, v, g, beta, lamb, state = make_inputs(1, 6, 1, 4, 3, initial_state=True, seed=3)

    def fn(q, k, v, g, beta, lamb, h_kk, h_kv):
        o, (a, b) = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=16, initial_state=(h_kk, h_kv),
                               output_final_state=True, chunk_size=4)
        return o, a, b

    h_kk = state[0]
    args = [t.requires_grad_() for t in (q, k, v, g, beta, lamb, h_kk, state[1])]
    # the state is symmetric by definition: perturb it symmetrically
    assert torch.autograd.gradcheck(lambda *a: fn(*a[:6], (a[6] + a[6].mT) / 2, a[7]), args, fast_mode=True)


@settings(max_examples=20)
@given(shape=shapes(), split=st.floats(0.05, 0.95), seed=st.integers(0, 2 ** 16))
def test_two_pieces_with_state_equal_one_pass(shape, split, seed):
    assume(shape['T'] > 1)
    q, k, v, g, beta, lamb, _ = make_inputs(**shape, seed=seed)
    t = max(1, min(shape['T'] - 1, int(split * shape['T'])))
    steps = converged_steps(shape['K'])
    o, s = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=steps, output_final_state=True, chunk_size=16)
    o1, s1 = chunk_mesa(*(x[:, :t] for x in (q, k, v, g, beta)), lamb, cg_steps=steps, output_final_state=True,
                        chunk_size=16)
    o2, s2 = chunk_mesa(*(x[:, t:] for x in (q, k, v, g, beta)), lamb, cg_steps=steps, initial_state=s1,
                        output_final_state=True, chunk_size=16)
    assert rel(torch.cat([o1, o2], 1), o) < EXACT
    assert rel(s2[0], s[0]) < EXACT and rel(s2[1], s[1]) < EXACT


@settings(max_examples=15)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4), with_state=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_varlen_equals_each_sequence(lengths, with_state, seed):
    N, T = len(lengths), sum(lengths)
    q, k, v, g, beta, lamb, _ = make_inputs(1, T, 2, 8, 4, seed=seed)
    _, _, _, _, _, _, state = make_inputs(N, 1, 2, 8, 4, initial_state=with_state, seed=seed + 1)
    cu = torch.tensor([0] + lengths).cumsum(0)
    o, s, grads = run_with_grads(chunk_mesa, q, k, v, g, beta, lamb, state, cg_steps=34, cu_seqlens=cu, chunk_size=16)
    for n in range(N):
        a, b = cu[n].item(), cu[n + 1].item()
        piece = [x[:, a:b] for x in (q, k, v, g, beta)]
        st_n = None if state is None else tuple(x[n:n + 1] for x in state)
        o_n, s_n = naive_recurrent_mesa(*piece, lamb, initial_state=st_n, output_final_state=True)
        assert rel(o[:, a:b], o_n) < EXACT
        assert rel(s[0][n:n + 1], s_n[0]) < EXACT and rel(s[1][n:n + 1], s_n[1]) < EXACT
    _, _, grads_ref = run_with_grads(
        lambda *a, initial_state, output_final_state: _per_sequence(cu, *a, initial_state=initial_state),
        q, k, v, g, beta, lamb, state)
    assert_grads_close(grads, grads_ref)


def _per_sequence(cu, q, k, v, g, beta, lamb, initial_state):
    outs, kk, kv = [], [], []
    for n in range(len(cu) - 1):
        a, b = cu[n].item(), cu[n + 1].item()
        st_n = None if initial_state is None else tuple(x[n:n + 1] for x in initial_state)
        o, (s_kk, s_kv) = naive_recurrent_mesa(*(x[:, a:b] for x in (q, k, v, g, beta)), lamb, initial_state=st_n,
                                               output_final_state=True)
        outs.append(o), kk.append(s_kk), kv.append(s_kv)
    return torch.cat(outs, 1), (torch.cat(kk), torch.cat(kv))


def test_many_more_steps_than_needed_stay_converged():
    """Iterating far past convergence must not diverge (the residual floor stops each token)."""
    q, k, v, g, beta, lamb, state = make_inputs(2, 200, 2, 64, 8, lamb_range=(0.25, 2.0), initial_state=True,
                                                dtype=torch.float32, seed=1)
    o_ref, _ = naive_recurrent_mesa(*(t.double() for t in (q, k, v, g, beta, lamb)),
                                    initial_state=tuple(x.double() for x in state))
    o, _ = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=300, initial_state=state)
    assert rel(o, o_ref) < 1e-5


def test_start_does_not_change_converged_output_or_gradients():
    inputs = make_inputs(2, 45, 2, 8, 4, lamb_range=(0.01, 1.0), initial_state=True, seed=7)
    o_j, s_j, g_j = run_with_grads(chunk_mesa, *inputs, cg_steps=40, cg_init='jacobi', chunk_size=16)
    o_z, s_z, g_z = run_with_grads(chunk_mesa, *inputs, cg_steps=40, cg_init='zero', chunk_size=16)
    assert rel(o_j, o_z) < EXACT
    assert_grads_close(g_j, g_z)


@pytest.mark.parametrize('cg_init', ['jacobi', 'zero'])
def test_backward_solve_starts_from_zero_at_the_floor_and_from_cg_init_under_a_tolerance(cg_init):
    """One CG step of the backward's solve (H_t + diag(lamb)) u_t = S_t do_t, whose u is dq: from x_0 = 0 without
    `cg_tol`, from the forward's start with it, against that step in float64 on the recurrence's states."""
    from fla_mesa.ops.utils import step_states
    q, k, v, g, beta, lamb, _ = make_inputs(1, 20, 2, 8, 4, lamb_range=(0.05, 2.0), seed=5)
    do = torch.randn(1, 20, 2, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    h_kk, h_kv = q.new_zeros(1, 2, 8, 8), q.new_zeros(1, 2, 8, 4)
    systems = []
    for t in range(20):
        h_kk, h_kv = step_states(h_kk, h_kv, k[:, t], v[:, t], g[:, t], beta[:, t])
        systems.append((h_kk + torch.diag_embed(lamb), torch.einsum('bhkv,bhv->bhk', h_kv, do[:, t])))
    for cg_tol, start in ((None, 'zero'), (1e-12, cg_init)):
        steps = []
        for a, c in systems:
            x0 = c / torch.diagonal(a, dim1=-2, dim2=-1) if start == 'jacobi' else torch.zeros_like(c)
            r0 = c - torch.einsum('bhij,bhj->bhi', a, x0)
            alpha = (r0 * r0).sum(-1, keepdim=True) / (r0 * torch.einsum('bhij,bhj->bhi', a, r0)).sum(-1, keepdim=True)
            steps.append(x0 + alpha * r0)
        qq = q.clone().requires_grad_()
        o, _ = chunk_mesa(qq, k, v, g, beta, lamb, cg_steps=1, cg_tol=cg_tol, cg_init=cg_init, chunk_size=16)
        dq, = torch.autograd.grad(o, qq, do)
        assert rel(dq, torch.stack(steps, 1)) < 1e-12, (cg_tol, start)


def test_kernel_floor_and_products_follow_the_products_precision(monkeypatch):
    """The CUDA kernel's CG floor is 2^-16 for its tf32 or float16 products, float32's eps where they are full
    float32; half-precision inputs get float16 products, float32 inputs float32 (tf32) ones."""
    import triton.language as tl
    from fla_mesa.ops.cg import TF32_FLOOR, kernel_floor, products_dtype
    monkeypatch.delenv('TRITON_F32_DEFAULT', raising=False)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    assert kernel_floor() == TF32_FLOOR == 2 ** -16
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    assert [products_dtype(d) for d in dtypes] == [tl.float16, tl.float16, tl.float32]
    for name, value in (('TRITON_F32_DEFAULT', 'ieee'), ('TRITON_INTERPRET', '1')):
        monkeypatch.setenv(name, value)
        assert kernel_floor() == torch.finfo(torch.float32).eps
        assert products_dtype(torch.bfloat16) == tl.float32
        monkeypatch.delenv(name)


def test_tolerance_stops_early_and_reports_iterations():
    q, k, v, g, beta, lamb, _ = make_inputs(2, 64, 2, 16, 4, lamb_range=(0.5, 2.0), seed=11)
    o_ref, _ = naive_recurrent_mesa(q, k, v, g, beta, lamb)
    _, _, few = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=5, return_cg_iters=True, chunk_size=16)
    assert few.dtype == torch.int32 and bool((few == 5).all())
    # without a tolerance a token stops only at the cap or at machine precision (||r|| <= eps ||r_0||)
    o, _, fixed = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=60, return_cg_iters=True, chunk_size=16)
    assert rel(o, o_ref) < 1e-12 and int(fixed.max()) < 60
    errs = []
    for tol in (1e-2, 1e-4, 1e-8):
        o, _, iters = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=30, cg_tol=tol, return_cg_iters=True,
                                 chunk_size=16)
        assert iters.shape == (2, 64, 2) and int(iters.max()) <= 30 and int(iters.min()) >= 1
        errs.append((rel(o, o_ref), iters.double().mean().item()))
    # a looser tolerance stops sooner and is less accurate; the tight one is exact
    assert errs[0][1] < errs[1][1] < errs[2][1] < fixed.double().mean().item()
    assert errs[0][0] > errs[1][0] > errs[2][0] and errs[2][0] < 1e-7


def test_jacobi_preconditioning_cuts_iterations_when_lamb_varies_across_channels():
    """lamb spread over channels makes H_t + diag(lamb) badly scaled: diag-preconditioned CG reaches the same exact
    solution in fewer iterations (benchmarks/ops/cg_preconditioning.py: 11 against 31 at K=128)."""
    q, k, v, g, beta, _, _ = make_inputs(1, 64, 2, 32, 8, seed=3)
    lamb = torch.logspace(-1, 1, 64, dtype=torch.float64).view(2, 32)
    o_ref, _ = naive_recurrent_mesa(q, k, v, g, beta, lamb)
    iters = {}
    for pre in ('none', 'jacobi'):
        o, _, iters[pre] = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=200, cg_precond=pre, return_cg_iters=True,
                                      chunk_size=16)
        assert rel(o, o_ref) < EXACT and int(iters[pre].max()) < 200
    assert iters['jacobi'].double().mean() < 0.75 * iters['none'].double().mean()


@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-4), (torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)])
def test_half_and_single_inputs_reach_the_rounding_floor(dtype, tol):
    """Compute is float32; beside the float64 solve on the same (rounded) inputs, what remains is the
    output's rounding to `dtype` (unit roundoff 2^-8 for bf16, 2^-11 for fp16) plus float32 noise."""
    q, k, v, g, beta, lamb, state = make_inputs(2, 70, 2, 16, 8, lamb_range=(0.25, 1.0), initial_state=True,
                                                dtype=dtype, seed=5)
    o, s = chunk_mesa(q, k, v, g, beta, lamb, cg_steps=30, initial_state=state, output_final_state=True)
    up = [t.double() for t in (q, k, v, g, beta, lamb)]
    o_ref, s_ref = naive_recurrent_mesa(*up, initial_state=tuple(x.double() for x in state), output_final_state=True)
    assert o.dtype == dtype and s[0].dtype == torch.float32 and s[1].dtype == torch.float32
    assert rel(o, o_ref) < tol
    assert rel(s[0], s_ref[0]) < 1e-5 and rel(s[1], s_ref[1]) < 1e-5


@pytest.mark.parametrize('dtype,tol', [(torch.float32, 2 ** -20), (torch.bfloat16, 2 ** -8 + 2 ** -20)])
def test_small_value_channels_and_tokens_keep_their_precision(dtype, tol):
    """Value channels from 1e-6 to 1e2 and tokens whose outputs are 1e-6 times their chunk's others: on the worst
    token and channel the error stays at the output's rounding to `dtype` (2^-8 for bf16) plus 16 units of float32's
    (2^-24), relative to ||G_t|| ||x_t||."""
    assert max(spread_errors(dtype, 'cpu', T=100, K=16, V=16)) < tol


def test_l2norm_in_kernel():
    q, k, v, g, beta, lamb, _ = make_inputs(1, 20, 2, 8, 4, seed=2)
    o, _ = chunk_mesa(q * 3, k * 0.5, v, g, beta, lamb, cg_steps=34, use_qk_l2norm_in_kernel=True, chunk_size=16)
    o_ref, _ = naive_recurrent_mesa(q * 3, k * 0.5, v, g, beta, lamb, use_qk_l2norm=True)
    assert rel(o, o_ref) < EXACT


def _bad(**override):
    q, k, v, g, beta, lamb, _ = make_inputs(2, 8, 2, 4, 4)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, lamb=lamb)
    args.update(override)
    return args


@pytest.mark.parametrize('override,match', [
    (dict(q=torch.zeros(2, 8, 4)), '`q`: expected a 4-d tensor'),
    (dict(k=torch.zeros(2, 8, 3, 4, dtype=torch.float64)), '`k`: expected the shape of q'),
    (dict(v=torch.zeros(2, 8, 3, 4, dtype=torch.float64)), '`v`: expected'),
    (dict(g=torch.zeros(2, 8, 3, dtype=torch.float64)), '`g`: expected shape'),
    (dict(g=torch.full((2, 8, 2), 0.1, dtype=torch.float64)), '`g`: expected a log forget gate'),
    (dict(beta=torch.zeros(2, 8, dtype=torch.float64)), '`beta`: expected shape'),
    (dict(lamb=torch.ones(2, 5, dtype=torch.float64)), r'`lamb`: expected shape \[H, K\]'),
    (dict(lamb=torch.zeros(2, 4, dtype=torch.float64)), '`lamb`: expected every entry > 0'),
    (dict(lamb=torch.ones(2, 4, dtype=torch.float64, device='meta')), '`lamb`: expected a tensor on cpu like q'),
    (dict(q=torch.zeros(2, 8, 2, 4, dtype=torch.int64)), '`q`: expected one of'),
    (dict(k=torch.zeros(2, 8, 2, 4, dtype=torch.float32)), '`k/v`: expected the dtype of q'),
    (dict(cu_seqlens=torch.tensor([0, 4, 8])), '`cu_seqlens`: expected batch size 1'),
    (dict(initial_state=(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 5))), r'`initial_state\[1\]`'),
    (dict(cg_steps=-1), '`cg_steps`'),
    (dict(cg_tol=0.0), '`cg_tol`'),
    (dict(cg_init='ones'), '`cg_init`'),
    (dict(cg_precond='diag'), '`cg_precond`'),
    (dict(chunk_size=24), '`chunk_size`'),
    (dict(fp32_backward='yes'), '`fp32_backward`'),
])
def test_bad_input_names_the_argument(override, match):
    with pytest.raises(ValueError, match=match):
        chunk_mesa(**_bad(**override))


@pytest.mark.parametrize('override,match', [
    (dict(lamb=torch.ones(2, 5, dtype=torch.float64)), r'`lamb`: expected shape \[H, K\]'),
    (dict(g=torch.zeros(2, 8, 3, dtype=torch.float64)), '`g`: expected shape'),
])
def test_check_values_false_skips_only_the_value_checks(override, match):
    args = _bad(lamb=-torch.ones(2, 4, dtype=torch.float64), g=torch.full((2, 8, 2), 0.1, dtype=torch.float64))
    o, _ = chunk_mesa(**args, cg_steps=2, check_values=False)  # lamb < 0 and g > 0 pass unread
    assert o.shape == (2, 8, 2, 4)
    with pytest.raises(ValueError, match=match):
        chunk_mesa(**{**args, **override}, check_values=False)


def test_gla_backward_rejects_dv_out_of_another_shape():
    # the backward's GLA gradient passes (Triton): the check runs before any launch, so it holds on the CPU too
    from fla_mesa.ops.gla_backward import chunk_gla_bwd
    x, row, state = torch.zeros(1, 8, 2, 4), torch.zeros(1, 8, 2), torch.zeros(1, 1, 2, 4, 4)
    with pytest.raises(ValueError, match="`dv_out` must have v's shape"):
        chunk_gla_bwd(x, x, x, row, x, state, state, row, dv_out=torch.zeros(1, 8, 2, 5))


def test_fused_backward_kernels_reject_other_shapes_and_float32_states():
    # the checks run before any launch, so they hold on the CPU too
    from fla_mesa.ops.cg import chunk_cg_solve
    from fla_mesa.ops.mesa_backward import mesa_bwd_dk, mesa_bwd_dw
    from fla_mesa.ops.scaled_states import ScaledStates
    x, row = torch.zeros(1, 8, 2, 4), torch.zeros(1, 8, 2)
    state = torch.zeros(1, 1, 2, 4, 4)
    scaled = ScaledStates.of(state)
    lamb = torch.ones(2, 4)
    # the adjoint solve that forms S_t do_t from do
    with pytest.raises(ValueError, match="adjoint=True needs `v` of b's shape with K <= 64 and `h_kv` as ScaledStates"):
        chunk_cg_solve(x, x, row, row, scaled, lamb, 1, None, 'jacobi', v=torch.zeros(1, 8, 2, 6), h_kv=scaled,
                       adjoint=True)
    with pytest.raises(ValueError, match="adjoint=True needs"):
        chunk_cg_solve(x, x, row, row, scaled, lamb, 1, None, 'jacobi', v=x, h_kv=state, adjoint=True)
    with pytest.raises(ValueError, match="adjoint=True needs"):
        chunk_cg_solve(x, x, row, row, scaled, lamb, 1, None, 'jacobi', adjoint=True)
    wide = torch.zeros(1, 8, 2, 80)
    with pytest.raises(ValueError, match="mesa_bwd_dk: expected v of k's shape with K <= 64"):
        mesa_bwd_dk(wide, wide, wide, row, wide, wide, row, scaled, scaled, scaled, scaled, row)
    with pytest.raises(ValueError, match="mesa_bwd_dk: `dh_u` must be `ScaledStates`"):
        mesa_bwd_dk(x, x, x, row, x, x, row, scaled, scaled, state, scaled, row)
    with pytest.raises(ValueError, match="mesa_bwd_dw: `dh_kv` must be `ScaledStates`"):
        mesa_bwd_dw(x, x, x, x, row, x, x, scaled, state, row, x)
    # the paired state-gradient scans: output gradients of one shape, final-state gradients for both or neither
    from fla_mesa.ops.states import chunk_state_grads_bwd, chunk_state_grads_pair_bwd
    with pytest.raises(ValueError, match=r"chunk_state_grads_pair_bwd: expected do2 of do's shape \(1, 8, 2, 4\), got "
                                         r"\(1, 8, 2, 3\)"):
        chunk_state_grads_pair_bwd(x, x, torch.zeros(1, 8, 2, 3), row)
    with pytest.raises(ValueError, match="expected both final-state gradients or neither"):
        chunk_state_grads_pair_bwd(x, x, x, row, dht=state[:, 0])
    wide = torch.zeros(1, 8, 2, 128)
    for fn, args in ((chunk_state_grads_bwd, (wide, x, row)), (chunk_state_grads_pair_bwd, (wide, x, x, row))):
        with pytest.raises(ValueError, match=fn.__name__ + r": expected K <= 64 \(one program holds a whole column\), "
                                             "got K=128"):
            fn(*args)


def test_bad_cu_seqlens_values():
    q, k, v, g, beta, lamb, _ = make_inputs(1, 8, 2, 4, 4)
    with pytest.raises(ValueError, match='`cu_seqlens`: expected non-decreasing offsets'):
        chunk_mesa(q, k, v, g, beta, lamb, cu_seqlens=torch.tensor([0, 5, 3, 8]))
