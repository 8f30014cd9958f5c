"""MesaConfig / MesaModel / MesaForCausalLM on CPU (float32); GPU-marked tests repeat key checks on CUDA in bf16."""

import glob
import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import fla_mesa  # noqa: F401
from fla_mesa.layers import MesaAttention
from fla_mesa.layers.attn import Attention
from fla_mesa.models import MesaConfig, MesaForCausalLM, MesaModel

pytestmark = pytest.mark.usefixtures('one_cpu_thread')

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')
V = 64
# a hybrid: layer 1 of 3 is softmax attention (grouped-query, 2 heads sharing 1 key-value head)
HYBRID = dict(num_hidden_layers=3, attn={'layers': [1], 'num_heads': 2, 'num_kv_heads': 1})
MODELS = pytest.mark.parametrize('kw', [{}, HYBRID], ids=['mesa', 'hybrid'])


def tiny_config(**kw):
    base = dict(hidden_size=32, num_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=V, intermediate_size=48,
                cg_steps=30, decode_cg_steps=30, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return MesaConfig(**{**base, **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = MesaForCausalLM(tiny_config(**kw))
    with torch.no_grad():  # forget gates away from 0.5 so that the state carries information
        for layer in model.model.layers:
            if isinstance(layer.attn, MesaAttention) and layer.attn.a_proj.bias is not None:
                layer.attn.a_proj.bias.uniform_(1.0, 4.0)
    return model


def test_auto_classes():
    config = AutoConfig.for_model('mesa', hidden_size=32, num_heads=2, head_dim=16, num_hidden_layers=1, vocab_size=V)
    assert isinstance(config, MesaConfig) and config.model_type == 'mesa'
    assert isinstance(AutoModel.from_config(config), MesaModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), MesaForCausalLM)


def test_config_knobs_reach_every_layer():
    kw = dict(cg_steps=7, decode_cg_steps=5, cg_tol=1e-3, cg_init='zero', forget_gate_cap=0.99, lambda_init=2.0,
              lambda_lower_bound=0.5, use_output_gate=True, use_mamba_gate=True, expand_v=2, conv_size=3,
              fp32_backward=False, cg_precond='jacobi')
    model = MesaForCausalLM(tiny_config(**kw))
    for block in model.model.layers:
        layer = block.attn
        assert isinstance(layer, MesaAttention)
        assert (layer.cg_steps, layer.decode_cg_steps, layer.cg_tol, layer.cg_init) == (7, 5, 1e-3, 'zero')
        assert layer.cg_precond == 'jacobi'
        assert (layer.forget_gate_cap, layer.lambda_lower_bound) == (0.99, 0.5)
        assert layer.fp32_backward is False
        assert layer.use_output_gate and layer.use_mamba_gate and layer.head_v_dim == 32
        assert layer.q_conv1d.kernel_size == (3,)
        assert torch.equal(layer.get_lambda(), torch.full((2, 16), 2.0))


def test_bad_configs_fail():
    with pytest.raises(ValueError, match='not divisible'):
        MesaForCausalLM(tiny_config(hidden_size=30, num_heads=4, head_dim=None))
    with pytest.raises(ValueError, match='lambda_lower_bound'):
        MesaForCausalLM(tiny_config(lambda_lower_bound=0))
    with pytest.raises(ValueError, match='final_logit_softcapping'):
        tiny_config(final_logit_softcapping=-1.0)
    with pytest.raises(ValueError, match='final_logit_softcapping'):
        tiny_config(final_logit_softcapping=30.0, fuse_linear_cross_entropy=True, fuse_cross_entropy=False)


def test_tied_and_untied_embeddings():
    assert MesaConfig().tie_word_embeddings
    tied, untied = tiny_model(), tiny_model(tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.model.embeddings.weight
    assert untied.lm_head.weight is not untied.model.embeddings.weight
    assert not torch.equal(untied.lm_head.weight, untied.model.embeddings.weight)


@pytest.mark.parametrize('tie, mamba', [(True, False), (False, True)])
def test_save_load_round_trip(tmp_path, tie, mamba):
    model = tiny_model(tie_word_embeddings=tie, use_mamba_gate=mamba, final_logit_softcapping=30.0).eval()
    with torch.no_grad():  # move lambda off its init so loading has to restore it
        for block in model.model.layers:
            block.attn.lambda_params.add_(torch.randn_like(block.attn.lambda_params))
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MesaForCausalLM)
    assert loaded.config.final_logit_softcapping == 30.0 and loaded.config.tie_word_embeddings == tie
    assert (loaded.lm_head.weight is loaded.model.embeddings.weight) == tie
    for (n, p), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)
    # fla's optimizer grouping reads `_no_weight_decay`; loading must keep it on lambda (and the Mamba gate)
    flagged = {n for n, p in loaded.named_parameters() if getattr(p, '_no_weight_decay', False)}
    expect = {n for n, _ in loaded.named_parameters() if n.endswith(('lambda_params', 'A_log', 'dt_bias'))}
    assert flagged == expect and len(expect) == (3 if mamba else 1) * loaded.config.num_hidden_layers


@MODELS
def test_prefill_then_decoding_matches_full_forward(kw):
    model = tiny_model(**kw).eval()
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(8, 12):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)


@MODELS
@pytest.mark.parametrize('left', [True, False])
def test_padded_batch_matches_each_sequence_alone(kw, left):
    model = tiny_model(**kw).eval()
    a, b = torch.randint(2, V, (1, 9)), torch.randint(2, V, (1, 5))
    filler = torch.full((1, 4), model.config.pad_token_id)
    ids = torch.cat([a, torch.cat([filler, b] if left else [b, filler], 1)])
    mask = torch.ones_like(ids)
    if left:
        mask[1, :4] = 0
    else:
        mask[1, 5:] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(logits[0], model(a).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[1, mask[1].bool()], model(b).logits[0], rtol=1e-5, atol=1e-5)


def greedy_by_recomputation(model, ids, n):
    """Greedy decoding by full recomputation, with EOS barred as `generate(min_new_tokens=n)` bars it."""
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[:, -1]
            logits[:, model.config.eos_token_id] = float('-inf')
            nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


@MODELS
def test_greedy_generate_matches_recomputation(kw):
    model = tiny_model(**kw).eval()
    ids = torch.randint(2, V, (2, 6))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         min_new_tokens=6)
    assert out.shape == (2, 12)
    assert torch.equal(out, greedy_by_recomputation(model, ids, 6))


@MODELS
def test_left_padded_generate_matches_each_prompt_alone(kw):
    model = tiny_model(**kw).eval()
    a, b = torch.randint(2, V, (1, 7)), torch.randint(2, V, (1, 4))
    pad = model.config.pad_token_id
    ids = torch.cat([a, torch.cat([torch.full((1, 3), pad), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert torch.equal(out[0, 7:], greedy_by_recomputation(model, a, 5)[0, 7:])
    assert torch.equal(out[1, 7:], greedy_by_recomputation(model, b, 5)[0, 4:])


def test_loss_decreases_and_every_parameter_gets_a_finite_gradient():
    model = tiny_model(cg_steps=10, final_logit_softcapping=30.0).train()
    torch.manual_seed(1)
    ids = torch.randint(0, V, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(6):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None, name
                assert torch.isfinite(p.grad).all(), name
                assert p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(cg_steps=10).train()
    ids = torch.randint(0, V, (2, 8))
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7)


def test_model_level_cg_telemetry():
    model = tiny_model(num_hidden_layers=3, cg_steps=16, cg_tol=1e-2).eval()
    ids = torch.randint(0, V, (2, 10))
    model.set_record_cg_iters(True)
    with torch.no_grad():
        model(ids)
    iters = model.get_cg_iters()
    assert sorted(iters) == [0, 1, 2]
    for it in iters.values():
        assert it.shape == (2, 10, 2) and (it >= 1).all() and (it <= 16).all()
    model.set_record_cg_iters(False)
    assert all(it is None for it in model.get_cg_iters().values())


@pytest.mark.parametrize('bad', [[3, 2], [-1, 2], [1.0, 2], [True, 2], [1, 2, 3], 4])
def test_cg_steps_train_range_is_checked(bad):
    with pytest.raises(ValueError, match='cg_steps_train_range'):
        tiny_config(cg_steps_train_range=bad)


def test_random_cg_steps_per_batch():
    """Training draws one count per batch for every layer (the loss is that of a model fixed at that count, every
    layer runs exactly that many iterations); evaluation uses cg_steps; the config round-trips."""
    model = tiny_model(num_hidden_layers=3, cg_steps=30, cg_steps_train_range=[1, 4]).train()
    assert MesaConfig.from_dict(model.config.to_dict()).cg_steps_train_range == [1, 4]
    ids = torch.randint(0, V, (2, 12))
    model.set_record_cg_iters(True)
    drawn = []
    for seed in range(6):
        torch.manual_seed(seed)
        n = int(torch.randint(1, 5, ()).item())
        torch.manual_seed(seed)
        loss = model(ids, labels=ids).loss
        for it in model.get_cg_iters().values():
            assert int(it.max()) == n
        fixed = tiny_model(num_hidden_layers=3, cg_steps=n).train()
        fixed.load_state_dict(model.state_dict())
        assert torch.equal(fixed(ids, labels=ids).loss, loss)
        drawn.append(n)
    assert len(set(drawn)) > 1
    model.eval()
    with torch.no_grad():
        model(ids)
    assert max(int(it.max()) for it in model.get_cg_iters().values()) > 4


def test_final_logit_softcapping_bounds_logits():
    model = tiny_model(final_logit_softcapping=30.0).eval()
    with torch.no_grad():
        model.model.embeddings.weight.mul_(1000.0)  # raw logits far beyond the cap
        model.model.norm.weight.fill_(10.0)
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        raw = model.lm_head(hidden)
        logits = model(ids).logits
    assert raw.abs().max() > 100
    assert logits.abs().max() <= 30.0
    torch.testing.assert_close(logits, 30.0 * torch.tanh(raw / 30.0))
    model.config.final_logit_softcapping = None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, raw)


def test_fused_and_unfused_options_agree_on_cpu():
    fused = tiny_model().eval()
    plain = MesaForCausalLM(tiny_config(fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False)).eval()
    plain.load_state_dict(fused.state_dict())
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        a, b = fused(ids, labels=ids), plain(ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss)


def test_hybrid_layers_are_softmax_attention_with_the_config_spec():
    model = tiny_model(**HYBRID)
    kinds = [type(block.attn) for block in model.model.layers]
    assert kinds == [MesaAttention, Attention, MesaAttention]
    attn = model.model.layers[1].attn
    assert (attn.num_heads, attn.num_kv_heads, attn.layer_idx) == (2, 1, 1)


def test_shipped_configs_load_and_have_the_paper_sizes():
    from transformers.utils import import_utils  # noqa: F401
    sizes = {'mesa_140M.json': (130e6, 150e6, 14, 768, 6), 'mesa_440M.json': (420e6, 450e6, 28, 1024, 8),
             'mesa_1B.json': (0.9e9, 0.97e9, 28, 1536, 12), 'mesa_340M.json': (0.3e9, 0.4e9, 24, 1024, 8)}
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, 'mesa_*.json')))
    assert found == sorted(sizes)
    for name, (lo, hi, layers, hidden, heads) in sizes.items():
        with open(os.path.join(CONFIG_DIR, name)) as f:
            config = AutoConfig.for_model(**json.load(f))
        assert (config.num_hidden_layers, config.hidden_size, config.num_heads, config.head_dim) == \
            (layers, hidden, heads, 128)
        assert config.cg_steps == 30
        if name != 'mesa_340M.json':  # the paper's setup
            assert config.vocab_size == 50257 and config.tie_word_embeddings
            assert config.final_logit_softcapping == 30.0 and config.intermediate_size == 3 * hidden
        with torch.device('meta'):
            model = AutoModelForCausalLM.from_config(config)
        n = sum(p.numel() for p in model.parameters())
        assert lo < n < hi, (name, n)


def test_flame_style_loading_and_deferred_init():
    """flame imports `--experimental.custom_model_path` as a package from its directory (torchtitan's
    `import_module_from_path`), builds the model on the meta device, marks every module uninitialised, moves it
    with `to_empty` and calls `post_init()`: the model must come out initialised as a normally built one."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent('''
        import importlib.util, os, sys
        path = sys.argv[1]
        spec = importlib.util.spec_from_file_location(os.path.basename(path), os.path.join(path, '__init__.py'))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        from transformers import AutoConfig
        print(type(AutoConfig.from_pretrained(sys.argv[2])).__name__)
    ''')
    package = os.path.dirname(fla_mesa.__file__)
    res = subprocess.run([sys.executable, '-c', script, package, os.path.join(CONFIG_DIR, 'mesa_140M.json')],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith('MesaConfig'), res.stderr[-2000:]

    config = tiny_config(fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False)
    with torch.device('meta'):
        model = AutoModelForCausalLM.from_config(config)
    model.apply(lambda m: setattr(m, '_is_hf_initialized', False))
    model.to_empty(device='cpu')
    with torch.no_grad():
        model.post_init()
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config)
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.isfinite(p).all(), name
        if r.numel() > 1 and r.std() > 0:
            assert 0.5 < (p.std() / r.std()).item() < 2 and abs((p.mean() - r.mean()).item()) < 0.1, name
        else:
            assert torch.equal(p, r), name
    for block in model.model.layers:
        assert torch.allclose(block.attn.get_lambda(), torch.ones_like(block.attn.get_lambda()))
    ids = torch.randint(0, V, (2, 16))
    assert torch.isfinite(model(ids, labels=ids).loss)


def assert_finite_train_step(model, ids):
    """A forward+backward on `ids` gives a finite loss and a finite gradient for every parameter."""
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.gpu
@cuda
def test_cuda_bf16_model_train_step_and_generate():
    model = tiny_model(final_logit_softcapping=30.0).cuda().to(torch.bfloat16)
    ids = torch.randint(2, V, (2, 40), device='cuda')
    assert_finite_train_step(model, ids)
    model.eval()
    gen = model.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=6, do_sample=False,
                         min_new_tokens=6)
    # bf16: recomputation and cached decoding may round differently; most greedy tokens agree
    ref = greedy_by_recomputation(model, ids[:, :8], 6)
    assert (gen == ref).float().mean() > 0.8


@pytest.mark.gpu
@cuda
def test_cuda_float32_logits_match_cpu():
    model = tiny_model().eval()
    ids = torch.randint(0, V, (2, 70))
    with torch.no_grad():
        ref = model(ids).logits
        out = model.cuda()(ids.cuda()).logits
    # the CUDA kernels may multiply float32 in TF32 (10-bit mantissa)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@cuda
def test_cuda_hybrid_softmax_attention_layers():
    model = tiny_model(num_hidden_layers=3, attn={'layers': [1], 'num_heads': 2}).cuda().to(torch.bfloat16)
    assert not isinstance(model.model.layers[1].attn, MesaAttention)
    ids = torch.randint(2, V, (2, 20), device='cuda')
    assert_finite_train_step(model, ids)
    model.eval()
    gen = model.generate(ids[:, :6], attention_mask=torch.ones_like(ids[:, :6]), max_new_tokens=4, do_sample=False,
                         min_new_tokens=4)
    assert gen.shape == (2, 10)
