"""The CPU paths of the fla module wrappers in fla_mesa.layers.modules against plain formulas (and, on CUDA,
against fla's Triton kernels with the same weights)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fla_mesa.layers.modules import FusedRMSNormGated, GatedMLP, RMSNorm, ShortConvolution, l2_norm

pytestmark = pytest.mark.usefixtures('one_cpu_thread')

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def conv_reference(x, conv, prefix=None):
    """causal depthwise conv + SiLU via nn.Conv1d's own padded forward; `prefix` [B, D, W-1] are earlier inputs."""
    T = x.shape[1]
    xt = x.transpose(1, 2)
    if prefix is not None:
        xt = torch.cat([prefix, xt], -1)
    y = F.conv1d(xt, conv.weight, conv.bias, padding=conv.kernel_size[0] - 1, groups=conv.hidden_size)
    y = y[..., :xt.shape[-1]][..., -T:]
    return F.silu(y).transpose(1, 2)


@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 12), D=st.integers(1, 9), W=st.integers(1, 5), bias=st.booleans())
def test_short_conv_matches_conv1d(T, D, W, bias):
    torch.manual_seed(T * 100 + D * 10 + W)
    conv = ShortConvolution(D, W, bias=bias)
    if bias:
        torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, T, D)
    y, state = conv(x, output_final_state=True)
    torch.testing.assert_close(y, conv_reference(x, conv), rtol=1e-5, atol=1e-6)
    # the state holds the last W raw inputs, newest last, zero-filled for short sequences
    expect = torch.cat([x.new_zeros(2, W, D), x], 1)[:, -W:].transpose(1, 2)
    torch.testing.assert_close(state, expect)


@pytest.mark.parametrize('split', [1, 3, 7])
def test_short_conv_cache_continuation(split):
    torch.manual_seed(split)
    D, W, T = 6, 4, 10
    conv = ShortConvolution(D, W)
    x = torch.randn(3, T, D)
    full, _ = conv(x)
    y1, cache = conv(x[:, :split], output_final_state=True)
    # the rest as one chunk
    y2, _ = conv(x[:, split:], cache=cache.clone(), output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, rtol=1e-5, atol=1e-6)
    # the rest token by token without autograd: the cache is updated in place (as fla's CUDA step)
    ys = [y1]
    with torch.no_grad():
        for t in range(split, T):
            before = cache
            y, cache = conv(x[:, t:t + 1], cache=cache, output_final_state=True)
            assert cache is before
            ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-5, atol=1e-6)


def test_short_conv_varlen_matches_separate():
    torch.manual_seed(0)
    conv = ShortConvolution(5, 4)
    lens = [3, 1, 6]
    xs = [torch.randn(1, n, 5) for n in lens]
    cu = torch.tensor([0, 3, 4, 10])
    y, state = conv(torch.cat(xs, 1), cu_seqlens=cu, output_final_state=True)
    for i, (x, s, e) in enumerate(zip(xs, cu[:-1], cu[1:])):
        yi, si = conv(x, output_final_state=True)
        torch.testing.assert_close(y[:, s:e], yi)
        torch.testing.assert_close(state[i], si[0])


def test_rms_norms_and_mlp_match_formulas():
    torch.manual_seed(0)
    x, r, g = torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    norm = RMSNorm(8, eps=1e-5)
    torch.nn.init.normal_(norm.weight)

    def rms(z):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight

    torch.testing.assert_close(norm(x), rms(x))
    y, res = norm(x, r, True)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(y, rms(x + r))
    for act, gate in (('swish', g * torch.sigmoid(g)), ('sigmoid', torch.sigmoid(g))):
        gnorm = FusedRMSNormGated(8, eps=1e-5, activation=act)
        gnorm.weight.data.copy_(norm.weight.data)
        torch.testing.assert_close(gnorm(x, g), rms(x) * gate)
    mlp = GatedMLP(8, intermediate_size=12)
    torch.testing.assert_close(mlp(x), mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    torch.testing.assert_close(l2_norm(x), x / x.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@cuda
def test_cuda_kernels_match_cpu_paths():
    """fla's Triton kernels (CUDA) and our CPU paths agree with the same weights, and conv caches are interchangeable."""
    torch.manual_seed(0)
    D, W = 64, 4
    conv = ShortConvolution(D, W)
    x = torch.randn(2, 9, D)
    y_cpu, s_cpu = conv(x, output_final_state=True)
    conv_gpu = ShortConvolution(D, W).cuda()
    conv_gpu.load_state_dict(conv.state_dict())
    y_gpu, s_gpu = conv_gpu(x.cuda(), output_final_state=True)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu)
    with torch.no_grad():
        nxt = torch.randn(2, 1, D)
        a, _ = conv(nxt, cache=s_gpu.cpu().clone(), output_final_state=True)
        b, _ = conv_gpu(nxt.cuda(), cache=s_cpu.cuda().clone(), output_final_state=True)
    torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
    norm, gnorm, mlp = RMSNorm(D), FusedRMSNormGated(D), GatedMLP(D, intermediate_size=96)
    for m in (norm, gnorm):
        torch.nn.init.normal_(m.weight)
    g = torch.randn_like(x)
    for m, args in ((norm, (x,)), (gnorm, (x, g)), (mlp, (x,))):
        ref = m(*args)
        out = m.cuda()(*(a.cuda() for a in args))
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
