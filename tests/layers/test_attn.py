"""fla_mesa.layers.attn.Attention (hybrid softmax layers) on CPU: against a float64 reference written here (RoPE as a
complex rotation), padding, packed sequences, cached decoding, and fla's parameter layout."""

import pytest
import torch
from fla.models.cache_utils import Cache
from hypothesis import given, settings
from hypothesis import strategies as st

from fla_mesa.layers.attn import Attention

pytestmark = pytest.mark.usefixtures('one_cpu_thread')

LAYERS = [dict(num_heads=4), dict(num_heads=4, num_kv_heads=2, qk_norm=True), dict(num_heads=2, window_size=3)]


def layer(seed=0, **kw):
    torch.manual_seed(seed)
    return Attention(hidden_size=32, layer_idx=0, **kw).eval()


def reference(attn, x):
    """softmax(q k^T / sqrt(d)) v per head in float64, causal (and windowed), RoPE on the two halves of each head."""
    x = x.double()
    B, T, _ = x.shape
    d, H, G = attn.head_dim, attn.num_heads, attn.num_kv_groups

    def proj(lin):
        w = lin.weight.double()
        return (x @ w.T + (lin.bias.double() if lin.bias is not None else 0)).unflatten(-1, (-1, d))

    q, k, v = proj(attn.q_proj), proj(attn.k_proj), proj(attn.v_proj)
    if attn.qk_norm:
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + attn.q_norm.eps) * attn.q_norm.weight.double()
        k = k * torch.rsqrt(k.square().mean(-1, keepdim=True) + attn.k_norm.eps) * attn.k_norm.weight.double()
    freq = 1.0 / attn.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(T, d // 2, dtype=torch.float64), torch.arange(T, dtype=torch.float64)[:, None] * freq)

    def rope(t):
        z = torch.complex(t[..., :d // 2], t[..., d // 2:]) * rot[:, None]
        return torch.cat([z.real, z.imag], -1)

    q, k = rope(q), rope(k).repeat_interleave(G, 2)
    v = v.repeat_interleave(G, 2)
    s = torch.einsum('bihd,bjhd->bhij', q, k) / d ** 0.5
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    keep = (j <= i) & ((j > i - attn.window_size) if attn.window_size else True)
    p = s.masked_fill(~keep, float('-inf')).softmax(-1)
    o = torch.einsum('bhij,bjhd->bihd', p, v).flatten(-2)
    return o @ attn.o_proj.weight.double().T


@settings(max_examples=25)
@given(B=st.integers(1, 3), T=st.integers(1, 40), heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4)]),
       head_dim=st.sampled_from([8, 16]), qk_norm=st.booleans(), window=st.one_of(st.none(), st.integers(1, 12)),
       seed=st.integers(0, 2 ** 16))
def test_matches_float64_reference(B, T, heads, head_dim, qk_norm, window, seed):
    torch.manual_seed(seed)
    H, H_kv = heads
    attn = Attention(hidden_size=H * head_dim, num_heads=H, num_kv_heads=H_kv, qk_norm=qk_norm, window_size=window,
                     layer_idx=0).eval()
    x = torch.randn(B, T, H * head_dim)
    with torch.no_grad():
        o, _, _ = attn(x)
    torch.testing.assert_close(o.double(), reference(attn, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kw', LAYERS, ids=['mha', 'gqa_qknorm', 'window'])
@pytest.mark.parametrize('left', [True, False])
@pytest.mark.parametrize('cached', [False, True])  # a cache makes positions discount left padding
def test_padded_batch_matches_each_sequence_alone(kw, left, cached):
    attn = layer(**kw)
    a, b = torch.randn(1, 9, 32), torch.randn(1, 5, 32)
    filler = torch.randn(1, 4, 32)
    x = torch.cat([a, torch.cat([filler, b] if left else [b, filler], 1)])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0 if left else 1
    mask[1, 5:] = 1 if left else 0
    with torch.no_grad():
        o, _, _ = attn(x, attention_mask=mask, past_key_values=Cache() if cached else None, use_cache=cached)
        torch.testing.assert_close(o[0], attn(a)[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o[1, mask[1].bool()], attn(b)[0][0], rtol=1e-5, atol=1e-5)
        assert (o[1, ~mask[1].bool()] == 0).all()


@pytest.mark.parametrize('kw', LAYERS, ids=['mha', 'gqa_qknorm', 'window'])
def test_packed_sequences_match_each_sequence_alone(kw):
    attn = layer(**kw)
    lengths = [3, 7, 1, 6]
    x = torch.randn(1, sum(lengths), 32)
    cu = torch.tensor([0, 3, 10, 11, 17])
    with torch.no_grad():
        o, _, _ = attn(x, cu_seqlens=cu)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            torch.testing.assert_close(o[:, s:e], attn(x[:, s:e])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kw', LAYERS, ids=['mha', 'gqa_qknorm', 'window'])
@pytest.mark.parametrize('padded', [False, True])
def test_prefill_then_decoding_matches_full_forward(kw, padded):
    attn = layer(**kw)
    x = torch.randn(2, 10, 32)
    mask = torch.ones(2, 10, dtype=torch.long)
    if padded:
        mask[1, :3] = 0  # left padding, as generate() gives it
    with torch.no_grad():
        full, _, _ = attn(x, attention_mask=mask if padded else None)
        cache = Cache()
        outs = [attn(x[:, :6], attention_mask=mask[:, :6] if padded else None, past_key_values=cache,
                     use_cache=True)[0]]
        for t in range(6, 8):  # one token at a time, then two at once
            outs.append(attn(x[:, t:t + 1], attention_mask=mask[:, :t + 1] if padded else None,
                             past_key_values=cache, use_cache=True)[0])
        outs.append(attn(x[:, 8:], attention_mask=mask if padded else None, past_key_values=cache, use_cache=True)[0])
    o = torch.cat(outs, 1)
    real = mask.bool()
    torch.testing.assert_close(o[real], full[real], rtol=1e-5, atol=1e-5)


def test_parameters_and_state_dict_are_fla_attention(monkeypatch):
    import fla.layers.attn as fla_attn
    monkeypatch.setattr(fla_attn, 'flash_attn_func', lambda *a, **k: None)  # fla's layer refuses to build without it
    kw = dict(hidden_size=32, num_heads=4, num_kv_heads=2, qkv_bias=True, qk_norm=True, window_size=8, layer_idx=1)
    theirs, ours = fla_attn.Attention(**kw), Attention(**kw)
    assert {n: p.shape for n, p in theirs.state_dict().items()} == {n: p.shape for n, p in ours.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.rotary.inv_freq, theirs.rotary.inv_freq)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match='num_kv_heads'):
        Attention(hidden_size=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match='attention_mask'):
        layer(num_heads=4)(torch.randn(1, 3, 32), attention_mask=torch.ones(1, 3, 3))


@pytest.mark.gpu
@pytest.mark.parametrize('kw', LAYERS, ids=['mha', 'gqa_qknorm', 'window'])
def test_cuda_matches_cpu(kw):
    """On CUDA, fla's Triton rotary and RMSNorm and CUDA's SDPA; float32, left padding, prefill then a decode step."""
    attn = layer(**kw)
    x = torch.randn(2, 40, 32)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7] = 0
    outs = []
    for dev in ('cpu', 'cuda'):
        attn, xd, md, cache = attn.to(dev), x.to(dev), mask.to(dev), Cache()
        with torch.no_grad():
            o1 = attn(xd[:, :39], attention_mask=md[:, :39], past_key_values=cache, use_cache=True)[0]
            o2 = attn(xd[:, 39:], attention_mask=md, past_key_values=cache, use_cache=True)[0]
        outs.append(torch.cat([o1, o2], 1).cpu())
    real = mask.bool()
    torch.testing.assert_close(outs[1][real], outs[0][real], rtol=1e-4, atol=1e-4)
