"""MesaAttention on CPU (float32): construction checks, padding/varlen, cached decoding, gradients, the forget-gate
cap on repeated inputs, CG telemetry; GPU-marked tests repeat the key checks on CUDA in bfloat16."""

import math

import pytest
import torch
import torch.nn.functional as F
from fla.models.cache_utils import Cache
from hypothesis import given, settings
from hypothesis import strategies as st

from fla_mesa.layers import MesaAttention
from fla_mesa.ops.utils import forget_gate_cap

pytestmark = pytest.mark.usefixtures('one_cpu_thread')

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

D, H, K = 32, 2, 16


def make_layer(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {'hidden_size': D, 'num_heads': H, 'head_dim': K, 'layer_idx': 0, **kw}
    layer = MesaAttention(**kw)
    with torch.no_grad():  # gates away from their zero-bias init so the test sees long memories too
        layer.a_proj.bias.data.uniform_(1.0, 4.0) if layer.a_proj.bias is not None else None
    return layer


@pytest.mark.parametrize('kwargs, match', [
    (dict(hidden_size=30, num_heads=4, head_dim=None), 'not divisible'),
    (dict(hidden_size=30, num_heads=4, head_dim=8), 'not divisible'),
    (dict(lambda_lower_bound=0.0), 'lambda_lower_bound'),
    (dict(lambda_lower_bound=-1.0), 'lambda_lower_bound'),
    (dict(lambda_init=0.25, lambda_lower_bound=0.25), 'lambda_init'),
    (dict(lambda_init=0.1), 'lambda_init'),
    (dict(mode='parallel'), 'mode'),
    (dict(cg_init='ones'), 'cg_init'),
    (dict(cg_precond='diag'), 'cg_precond'),
    (dict(cg_steps=-1), 'cg_steps'),
    (dict(decode_cg_steps=1.5), 'decode_cg_steps'),
    (dict(cg_tol=2.0), 'cg_tol'),
    (dict(forget_gate_cap=1.5), 'forget_gate_cap'),
    (dict(expand_v=0.3), 'expand_v'),
])
def test_bad_configs_raise(kwargs, match):
    kw = {'hidden_size': D, 'num_heads': H, 'head_dim': K, **kwargs}
    with pytest.raises(ValueError, match=match):
        MesaAttention(**kw)


@pytest.mark.parametrize('lambda_init, lower', [(1.0, 0.25), (2.5, 0.5), (0.3, 0.25)])
def test_lambda_init_exact_and_no_weight_decay(lambda_init, lower):
    layer = make_layer(lambda_init=lambda_init, lambda_lower_bound=lower)
    lamb = layer.get_lambda()
    assert lamb.shape == (H, K)
    assert torch.equal(lamb, torch.full_like(lamb, lambda_init))
    assert layer.lambda_params._no_weight_decay
    # the lower bound holds however far the parameter moves
    with torch.no_grad():
        layer.lambda_params.fill_(-1e4)
    assert (layer.get_lambda() >= lower).all() and (layer.get_lambda() - lower).abs().max() < 1e-6


def test_head_dim_default_and_shapes():
    layer = MesaAttention(hidden_size=48, num_heads=3, head_dim=None, expand_v=2, use_output_gate=True)
    assert layer.head_k_dim == 16 and layer.head_v_dim == 32
    o, attn, cache = layer(torch.randn(2, 5, 48))
    assert o.shape == (2, 5, 48) and attn is None and cache is None


def test_gates_apply_the_cap():
    layer = make_layer()
    x = torch.randn(2, 5, D)
    g, beta = layer.get_gates(x)
    raw = F.logsigmoid(layer.a_proj(x).float())
    torch.testing.assert_close(beta, layer.b_proj(x).sigmoid())
    torch.testing.assert_close(g, raw + torch.log1p(-(1 - 0.9975) * beta ** 2))
    torch.testing.assert_close(g, forget_gate_cap(raw, beta, 0.9975))
    assert (g < raw).all()
    layer.forget_gate_cap = None
    torch.testing.assert_close(layer.get_gates(x)[0], raw)


@pytest.mark.parametrize('use_output_gate', [False, True])
def test_layer_matches_the_paper_formula(use_output_gate):
    """The layer, end to end, against its formula with an exact solve: convs + SiLU on q, k; L2-normalised q, k;
    o_t = G_t (H_t + diag(lambda))^-1 q_t with the capped forget gate; per-head (gated) RMSNorm; o_proj."""
    from fla_mesa.ops.naive import naive_recurrent_mesa
    layer = make_layer(use_output_gate=use_output_gate, cg_steps=40)
    with torch.no_grad():
        layer.lambda_params.normal_()
    x = torch.randn(2, 11, D, dtype=torch.float64)
    with torch.no_grad():
        o, _, _ = layer(x.float())
        lay = layer.double()
        q = F.silu(F.conv1d(F.pad(lay.q_proj(x).transpose(1, 2), (3, 0)), lay.q_conv1d.weight, groups=H * K))
        k = F.silu(F.conv1d(F.pad(lay.k_proj(x).transpose(1, 2), (3, 0)), lay.k_conv1d.weight, groups=H * K))
        q, k = (t.transpose(1, 2).unflatten(-1, (H, K)) for t in (q, k))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        v = lay.v_proj(x).unflatten(-1, (H, K))
        beta = torch.sigmoid(lay.b_proj(x))
        g = F.logsigmoid(lay.a_proj(x)) + torch.log1p(-(1 - 0.9975) * beta ** 2)
        lamb = F.softplus(lay.lambda_params) + 0.25
        ref, _ = naive_recurrent_mesa(q, k, v, g, beta, lamb)
        ref = ref * torch.rsqrt(ref.pow(2).mean(-1, keepdim=True) + 1e-5) * lay.o_norm.weight
        if use_output_gate:
            gate = lay.g_proj(x).unflatten(-1, (H, K))
            ref = ref * gate * torch.sigmoid(gate)
        ref = lay.o_proj(ref.flatten(-2))
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(lens=st.lists(st.integers(1, 9), min_size=2, max_size=3), left=st.booleans())
def test_padding_matches_each_sequence_alone(lens, left):
    layer = make_layer().eval()
    T = max(lens)
    torch.manual_seed(sum(lens))
    x = torch.randn(len(lens), T, D)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, T - n:] = 1 if left else 0
        if not left:
            mask[i, :n] = 1
    with torch.no_grad():
        o, _, _ = layer(x, attention_mask=mask)
        for i, n in enumerate(lens):
            real = mask[i].bool()
            alone, _, _ = layer(x[i:i + 1, real])
            torch.testing.assert_close(o[i, real], alone[0], rtol=1e-5, atol=1e-5)
            assert (o[i, ~real] == 0).all()


def test_varlen_cu_seqlens_matches_separate():
    layer = make_layer()
    lens = [5, 2, 7]
    xs = [torch.randn(1, n, D) for n in lens]
    cu = torch.tensor([0, 5, 7, 14])
    with torch.no_grad():
        o, _, _ = layer(torch.cat(xs, 1), cu_seqlens=cu)
        for x, s, e in zip(xs, cu[:-1], cu[1:]):
            torch.testing.assert_close(o[:, s:e], layer(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('use_output_gate, use_mamba_gate', [(False, False), (True, True)])
def test_prefill_then_decoding_matches_full_forward(use_output_gate, use_mamba_gate):
    # head dim 16: 30 CG steps solve the 16x16 systems to float32 accuracy, in the chunk and the recurrent kernel
    layer = make_layer(use_output_gate=use_output_gate, use_mamba_gate=use_mamba_gate, cg_steps=30,
                       decode_cg_steps=30).eval()
    x = torch.randn(2, 16, D)
    with torch.no_grad():
        full, _, _ = layer(x)
        cache = Cache()
        outs = [layer(x[:, :7], past_key_values=cache, use_cache=True)[0]]
        for t in range(7, 12):  # one token at a time
            outs.append(layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0])
        outs.append(layer(x[:, 12:], past_key_values=cache, use_cache=True)[0])  # a few tokens at once
    assert cache.get_seq_length() == 16
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)
    h_kk, h_kv = cache[0]['recurrent_state']
    assert h_kk.shape == (2, H, K, K) and h_kv.shape == (2, H, K, K) and h_kk.dtype == torch.float32


def test_padded_prefill_then_decoding_matches_each_sequence():
    layer = make_layer(cg_steps=30, decode_cg_steps=30).eval()
    x = torch.randn(2, 10, D)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding as in batched generation
    with torch.no_grad():
        cache = Cache()
        outs = [layer(x[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True)[0]]
        for t in range(6, 10):
            outs.append(layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)[0])
        o = torch.cat(outs, 1)
        torch.testing.assert_close(o[0, 4:], layer(x[:1, 4:])[0][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(o[1], layer(x[1:])[0][0], rtol=1e-4, atol=1e-5)


def test_layer_skips_the_ops_value_checks(monkeypatch):
    """lamb > 0 and g <= 0 hold by construction; the ops' checks of them would wait for the device on CUDA."""
    import fla_mesa.layers.mesa as mesa_module
    seen = []
    for name in ('chunk_mesa', 'fused_recurrent_mesa'):
        op = getattr(mesa_module, name)
        monkeypatch.setattr(mesa_module, name,
                            lambda *a, _op=op, _n=name, **kw: seen.append((_n, kw['check_values'])) or _op(*a, **kw))
    layer, cache = make_layer(), Cache()
    x = torch.randn(1, 5, D)
    with torch.no_grad():
        layer(x[:, :4], past_key_values=cache, use_cache=True)
        layer(x[:, 4:], past_key_values=cache, use_cache=True)
    assert seen == [('chunk_mesa', False), ('fused_recurrent_mesa', False)]  # prefill, then one decoded token


@pytest.mark.parametrize('cg_precond', ['none', 'jacobi'])
def test_fused_recurrent_mode_matches_chunk(cg_precond):
    chunk = make_layer(cg_steps=30, cg_precond=cg_precond).eval()
    rec = make_layer(cg_steps=30, mode='fused_recurrent', cg_precond=cg_precond).eval()
    assert chunk.cg_precond == cg_precond
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        torch.testing.assert_close(rec(x)[0], chunk(x)[0], rtol=1e-4, atol=1e-5)
    # autograd always goes through the chunk kernel
    o, _, _ = rec(x)
    o.sum().backward()
    assert rec.q_proj.weight.grad is not None


@pytest.mark.parametrize('kw', [dict(), dict(use_output_gate=True, use_mamba_gate=True, conv_bias=True)])
def test_every_parameter_gets_a_finite_gradient(kw):
    layer = make_layer(cg_steps=10, **kw)
    x = torch.randn(2, 12, D, requires_grad=True)
    o, _, _ = layer(x)
    (o * torch.randn_like(o)).sum().backward()
    for name, p in list(layer.named_parameters()) + [('input', x)]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_record_cg_iters():
    layer = make_layer(cg_steps=12, cg_tol=1e-3)
    x = torch.randn(2, 8, D)
    layer(x)
    assert layer.last_cg_iters is None
    layer.record_cg_iters = True
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    o, _, _ = layer(x, attention_mask=mask)
    it = layer.last_cg_iters
    assert it.shape == (2, 8, H) and not it.is_floating_point()
    assert (it[mask.bool()] >= 1).all() and (it <= 12).all()
    assert (it[1, :3] == 0).all()
    # the recorded counts follow the tolerance: a looser one never needs more iterations
    layer.cg_tol = 0.3
    layer(x, attention_mask=mask)
    assert (layer.last_cg_iters <= it).all() and layer.last_cg_iters.sum() < it.sum()
    # decoding through the recurrent kernel reports its counts too
    cache = Cache()
    with torch.no_grad():
        layer(x[:, :7], past_key_values=cache, use_cache=True)
        layer(x[:, 7:], past_key_values=cache, use_cache=True)
    it = layer.last_cg_iters
    assert it.shape == (2, 1, H) and (it >= 1).all() and (it <= layer.decode_cg_steps).all()


def test_cg_steps_override_per_call():
    layer = make_layer(cg_steps=30)
    x = torch.randn(2, 9, D)
    ref = make_layer(cg_steps=3)(x)[0]
    assert torch.equal(layer(x, cg_steps=3)[0], ref)
    assert not torch.equal(layer(x)[0], ref)
    with pytest.raises(ValueError, match='cg_steps'):
        layer(x, cg_steps=-1)
    # decoding keeps decode_cg_steps
    layer.record_cg_iters = True
    cache = Cache()
    with torch.no_grad():
        layer(x[:, :8], past_key_values=cache, use_cache=True)
        layer(x[:, 8:], past_key_values=cache, use_cache=True, cg_steps=1)
    assert int(layer.last_cg_iters.max()) > 1


@pytest.mark.parametrize('pattern_len', [1, 3])
def test_repeated_input_is_stable_and_the_cap_matters(pattern_len):
    """4096 copies of one input vector (or of a short pattern), then fresh tokens: the paper's 'screaming' case
    (appendix G.5)."""
    T = 4096
    layer = make_layer(hidden_size=16, num_heads=1, head_dim=16, cg_steps=8)
    with torch.no_grad():  # forget gate ~ 1 (sigmoid(8)), full input gate: the regime where H blows up
        layer.a_proj.bias.fill_(8.0)
        layer.b_proj.bias.fill_(8.0)
    torch.manual_seed(pattern_len)
    pattern = torch.randn(1, pattern_len, 16)
    x = pattern.repeat(1, T // pattern_len + 1, 1)[:, :T]
    x = torch.cat([x, torch.randn(1, 32, 16)], 1).requires_grad_()
    o, _, capped = layer(x, past_key_values=Cache(), use_cache=True)
    assert torch.isfinite(o).all()
    o.float().pow(2).mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        layer.forget_gate_cap = None
        uncapped_o, _, uncapped = layer(x, past_key_values=Cache(), use_cache=True)
    assert torch.isfinite(uncapped_o).all()
    # the cap bounds the key-key state (||H|| <~ beta / (1 - gamma)) ...
    assert capped[0]['recurrent_state'][0].norm() < 0.5 * uncapped[0]['recurrent_state'][0].norm()
    # ... and visibly changes what the layer outputs on the tokens after the run
    diff = (o[:, T:] - uncapped_o[:, T:]).abs().max()
    assert diff > 0.05 * o[:, T:].abs().max(), diff


@pytest.mark.gpu
@cuda
def test_cuda_bf16_layer_matches_cpu_float32():
    layer = make_layer(cg_steps=30)
    x = torch.randn(2, 70, D)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[0, :9] = 0
    with torch.no_grad():
        ref, _, _ = layer(x, attention_mask=mask)
    gpu = make_layer(cg_steps=30).cuda().to(torch.bfloat16)
    gpu.load_state_dict(layer.state_dict())
    xg = x.cuda().bfloat16().requires_grad_()
    o, _, _ = gpu(xg, attention_mask=mask.cuda())
    # bf16 activations (8 bits of mantissa) through two projections and a norm
    torch.testing.assert_close(o.float().cpu(), ref, rtol=5e-2, atol=5e-2)
    o.float().pow(2).sum().backward()
    for name, p in gpu.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.gpu
@cuda
def test_cuda_layer_never_waits_for_the_device():
    """Training step, prefill and decoding without a host-device sync (after the first call's compiling and
    autotuning): what CUDA-graph capture and CPU/GPU overlap need."""
    layer = make_layer(cg_steps=30).cuda().to(torch.bfloat16)
    x = torch.randn(2, 70, D, device='cuda', dtype=torch.bfloat16)

    def run():
        layer.train()(x.requires_grad_())[0].float().sum().backward()
        with torch.no_grad():
            layer.eval()  # one new token: fused_recurrent_mesa
            cache = Cache()
            layer(x[:, :69], past_key_values=cache, use_cache=True)
            layer(x[:, 69:], past_key_values=cache, use_cache=True)

    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode('default')


@pytest.mark.gpu
@cuda
def test_cuda_bf16_decoding_matches_full_forward():
    layer = make_layer(cg_steps=30, decode_cg_steps=30).cuda().to(torch.bfloat16).eval()
    x = torch.randn(2, 40, D, device='cuda', dtype=torch.bfloat16)
    with torch.no_grad():
        full, _, _ = layer(x)
        cache = Cache()
        outs = [layer(x[:, :30], past_key_values=cache, use_cache=True)[0]]
        for t in range(30, 40):
            outs.append(layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0])
    torch.testing.assert_close(torch.cat(outs, 1).float(), full.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@cuda
def test_cuda_repeated_input_finite():
    layer = make_layer(hidden_size=128, num_heads=1, head_dim=128).cuda().to(torch.bfloat16)
    with torch.no_grad():
        layer.a_proj.bias.fill_(8.0)
        layer.b_proj.bias.fill_(8.0)
    x = torch.randn(1, 1, 128, device='cuda', dtype=torch.bfloat16).repeat(1, 4096, 1).requires_grad_()
    o, _, _ = layer(x)
    o.float().pow(2).mean().backward()
    assert torch.isfinite(o).all() and torch.isfinite(x.grad).all()
    assert not math.isnan(layer.lambda_params.grad.sum().item())


@pytest.mark.gpu
@cuda
def test_cuda_record_cg_iters_with_padding():
    layer = make_layer(cg_steps=20, cg_tol=1e-3).cuda().to(torch.bfloat16)
    layer.record_cg_iters = True
    x = torch.randn(2, 33, D, device='cuda', dtype=torch.bfloat16)
    mask = torch.ones(2, 33, dtype=torch.long, device='cuda')
    mask[1, :5] = 0
    layer(x, attention_mask=mask)
    it = layer.last_cg_iters
    assert it.shape == (2, 33, H) and not it.is_floating_point()
    assert (it[mask.bool()] >= 1).all() and (it <= 20).all() and (it[1, :5] == 0).all()
