"""The models compared by `compare.py` and `benchmarks/mqar/train_mqar.py`, built at equal width and depth.

    mesa            fla_mesa's MesaForCausalLM (this repo)          heads of dim `head_dim` (128), expand_v 1
    mesanet         fla's MesaNetForCausalLM (upstream MesaNet)     same heads; max_cg_step_training = cg_steps
    gated_deltanet  fla's GatedDeltaNetForCausalLM                  same heads, expand_v 1
    gla             fla's GLAForCausalLM                            same number of heads, fla defaults otherwise
                                                                    (expand_k 0.5, output gate)
    transformer     fla's TransformerForCausalLM (softmax, RoPE)    heads of dim 64

All: SwiGLU MLP of hidden_ratio 4, tied embeddings, the given vocab. Parameter counts are printed by the scripts;
they differ a little between mixers (gates, convolutions, GLA's narrower keys).

Only `mesa` runs on CPU: fla's other models call Triton kernels (norms, rotary, their ops) that need CUDA.

fla's softmax `Attention` needs flash-attn. When flash-attn is not installed, `build_model('transformer', ...)`
installs a stand-in for `fla.layers.attn.flash_attn_func` built on `torch.nn.functional.scaled_dot_product_attention`
(causal, full window, [B, T, H, D] layout; fla calls it this way when there is no padding mask and no cu_seqlens,
which is how these scripts call the models) and prints that it did so; results say `attention=sdpa-shim`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

ALL_MODELS = ('mesa', 'mesanet', 'gated_deltanet', 'gla', 'transformer')
GPU_ONLY = frozenset({'mesanet', 'gated_deltanet', 'gla', 'transformer'})


def _sdpa_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **kw):
    """`flash_attn_func` stand-in: q, k, v `[B, T, H, D]` -> `[B, T, H, D]`. Full windows only; GQA by repeating."""
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError("SDPA stand-in for flash_attn_func: sliding windows are not supported")
    if kw.get('alibi_slopes') is not None:
        raise NotImplementedError("SDPA stand-in for flash_attn_func: alibi is not supported")
    if k.shape[2] != q.shape[2]:
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                                       is_causal=causal, scale=softmax_scale)
    return o.transpose(1, 2)


def _flash_attn_varlen_unavailable(*args, **kwargs):
    raise NotImplementedError("flash-attn is not installed; the SDPA stand-in covers unpadded batches only "
                              "(no attention_mask, no cu_seqlens)")


def ensure_softmax_attention() -> str:
    """'flash-attn' if fla's Attention has flash-attn, else installs the SDPA stand-in and returns 'sdpa-shim'."""
    import fla.layers.attn as attn
    if attn.flash_attn_func is not None and attn.flash_attn_func is not _sdpa_flash_attn_func:
        return 'flash-attn'
    if attn.flash_attn_func is None:
        warnings.warn("flash-attn is not installed: fla's softmax Attention will run on a torch SDPA stand-in for "
                      "flash_attn_func (benchmarks/lm/zoo.py)")
        print("[zoo] flash-attn is not installed: fla's TransformerForCausalLM runs its attention through "
              "torch.nn.functional.scaled_dot_product_attention (causal) via a flash_attn_func stand-in")
        attn.flash_attn_func = _sdpa_flash_attn_func
        attn.flash_attn_varlen_func = _flash_attn_varlen_unavailable
    return 'sdpa-shim'


def build_model(name: str, hidden_size: int, num_layers: int, vocab_size: int, device: torch.device,
                head_dim: int = 128, cg_steps: int = 30, max_len: int = 2048, bos: int | None = None,
                eos: int | None = None, tie_word_embeddings: bool = True, mesa_gate_bias: float | None = None,
                mesanet_gate_bias: float | None = None, **mesa_overrides):
    """Returns `(model, info)`; `info` holds the config summary (and the attention backend for 'transformer').

    `mesa_overrides` go to `MesaConfig`; `mesa_gate_bias` sets the bias of Mesa's sigmoid forget gate after
    initialisation (gamma = sigmoid(bias) at the start; fla's initialisation gives 0, gamma = 0.5), and
    `mesanet_gate_bias` that of fla MesaNet's, which has the same gate (g = logsigmoid(a_proj(x)))."""
    fused = device.type == 'cuda'
    if name in GPU_ONLY and not fused:
        raise RuntimeError(f"model '{name}' uses fla's Triton kernels and needs CUDA; on CPU only 'mesa' runs")
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of head_dim={head_dim}")
    heads = hidden_size // head_dim
    common_kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, vocab_size=vocab_size,
                     tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max(2048, max_len), hidden_ratio=4,
                     fuse_norm=fused, fuse_swiglu=fused, fuse_cross_entropy=fused, bos_token_id=bos,
                     eos_token_id=eos, pad_token_id=eos)
    info = {'name': name}
    if name == 'mesa':
        from fla_mesa import MesaConfig, MesaForCausalLM
        cfg = MesaConfig(num_heads=heads, head_dim=head_dim, cg_steps=cg_steps, decode_cg_steps=cg_steps,
                         **common_kw, **mesa_overrides)
        model = MesaForCausalLM(cfg)
        if mesa_gate_bias is not None:
            if cfg.use_mamba_gate:
                raise ValueError("mesa_gate_bias is for the sigmoid forget gate, not use_mamba_gate")
            info['gate_bias'] = set_gate_bias(model, mesa_gate_bias)
        info.update(heads=heads, head_dim=head_dim, cg_steps=cg_steps, **mesa_overrides)
    elif name == 'mesanet':
        from fla.models import MesaNetConfig, MesaNetForCausalLM
        cfg = MesaNetConfig(num_heads=heads, head_dim=head_dim, max_cg_step_training=cg_steps,
                            max_cg_step_decoding=cg_steps, **common_kw)
        model = MesaNetForCausalLM(cfg)
        if mesanet_gate_bias is not None:
            info['gate_bias'] = set_gate_bias(model, mesanet_gate_bias)
        info.update(heads=heads, head_dim=head_dim, cg_steps=cg_steps)
    elif name == 'gated_deltanet':
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
        cfg = GatedDeltaNetConfig(num_heads=heads, head_dim=head_dim, expand_v=1.0, **common_kw)
        model = GatedDeltaNetForCausalLM(cfg)
        info.update(heads=heads, head_dim=head_dim, expand_v=1.0)
    elif name == 'gla':
        from fla.models import GLAConfig, GLAForCausalLM
        cfg = GLAConfig(num_heads=heads, **common_kw)
        model = GLAForCausalLM(cfg)
        info.update(heads=heads, expand_k=cfg.expand_k, expand_v=cfg.expand_v)
    elif name == 'transformer':
        info['attention'] = ensure_softmax_attention()
        from fla.models import TransformerConfig, TransformerForCausalLM
        t_heads = max(1, hidden_size // 64)
        cfg = TransformerConfig(num_heads=t_heads, **common_kw)
        model = TransformerForCausalLM(cfg)
        info.update(heads=t_heads, head_dim=hidden_size // t_heads)
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {ALL_MODELS}")
    model = model.to(device)
    info['params'] = sum(p.numel() for p in model.parameters())
    return model, info


def set_gate_bias(model, bias: float) -> float:
    """Fills the bias of the forget-gate projection `a_proj` of every Mesa or MesaNet layer of `model` (the hybrid
    models' softmax layers have none) with `bias`; returns it."""
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.attn, 'a_proj'):
                layer.attn.a_proj.bias.fill_(bias)
    return bias


def add_mesa_gate_args(parser) -> None:
    """The Mesa forget-gate options of the comparison scripts; `mesa_gate_config(args)` puts them in their config."""
    parser.add_argument('--mesa-mamba-gate', action='store_true',
                        help="Mesa with the Mamba-style forget gate (use_mamba_gate=True: long memory at the start), "
                             "as row 'mesa+mamba_gate'")
    parser.add_argument('--mesa-gate-bias', type=float,
                        help="initial bias B of Mesa's sigmoid forget gate (gamma = sigmoid(B) at the start; "
                             "default 0), as row 'mesa+gate_biasB'")
    parser.add_argument('--mesanet-gate-bias', type=float,
                        help="the same for fla's MesaNet (its forget gate is the same sigmoid), as row "
                             "'mesanet+gate_biasB'")


def mesa_gate_config(args) -> dict:
    return {'mesa_mamba_gate': args.mesa_mamba_gate, 'mesa_gate_bias': args.mesa_gate_bias,
            'mesanet_gate_bias': args.mesanet_gate_bias}


def mesa_variant(name: str, cfg: dict) -> tuple[dict, str]:
    """`build_model` options and the row label for `cfg`'s forget-gate options (`mesa_mamba_gate`, `mesa_gate_bias`
    for Mesa, `mesanet_gate_bias` for fla's MesaNet); other models get none."""
    if name == 'mesanet' and cfg.get('mesanet_gate_bias') is not None:
        return {'mesanet_gate_bias': cfg['mesanet_gate_bias']}, f"mesanet+gate_bias{cfg['mesanet_gate_bias']:g}"
    if name != 'mesa':
        return {}, name
    options, label = {}, name
    if cfg.get('mesa_mamba_gate'):
        options['use_mamba_gate'] = True
        label += '+mamba_gate'
    if cfg.get('mesa_gate_bias') is not None:
        options['mesa_gate_bias'] = cfg['mesa_gate_bias']
        label += f"+gate_bias{cfg['mesa_gate_bias']:g}"
    return options, label


def parse_models(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(',') if s.strip()]
    if names == ['all']:
        return list(ALL_MODELS)
    bad = [n for n in names if n not in ALL_MODELS]
    if bad:
        raise SystemExit(f"unknown model(s) {bad}; choose from {ALL_MODELS} or 'all'")
    return names
