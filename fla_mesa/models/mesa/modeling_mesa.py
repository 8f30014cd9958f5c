"""MesaNet language models (arXiv 2506.05233) on fla's model utilities."""

from __future__ import annotations

import torch
import torch.nn as nn
from fla.models.generation_utils import FLAUnsupportedCacheGenerationMixin
from fla.models.configuration_utils import get_attention_spec
from fla.models.modeling_utils import FLAForCausalLM, FLAModel, FLAPreTrainedModel
from fla.modules import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss
from fla.modules.l2warp import l2_warp
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import logging

from fla_mesa.layers.attn import Attention
from fla_mesa.layers.mesa import MesaAttention
from fla_mesa.layers.modules import GatedMLP as MesaMLP
from fla_mesa.layers.modules import RMSNorm
from fla_mesa.models.mesa.configuration_mesa import MesaConfig

logger = logging.get_logger(__name__)


def build_softmax_attention(config: MesaConfig, layer_idx: int) -> Attention | None:
    """Softmax `Attention` (fla's layer, computed with PyTorch's SDPA: `fla_mesa.layers.attn`) for the layers listed
    in `config.attn`, else `None`."""
    spec = get_attention_spec(config.attn, layer_idx=layer_idx)
    if spec is None:
        return None
    return Attention(hidden_size=config.hidden_size, num_heads=spec['num_heads'], num_kv_heads=spec['num_kv_heads'],
                     qkv_bias=spec['qkv_bias'], window_size=spec['window_size'], rope_theta=spec['rope_theta'],
                     max_position_embeddings=config.max_position_embeddings, layer_idx=layer_idx)


def _take_cache_kwarg(kwargs: dict) -> dict:
    """transformers >= 5.2x passes the cache as `cache` (`past_key_values` is its deprecated name); fla's models and
    layers read `past_key_values`. Without this, `generate()` would silently restart from an empty state each step."""
    cache = kwargs.pop('cache', None)
    if cache is not None:
        past = kwargs.get('past_key_values')
        if past is not None and past is not cache:
            raise ValueError("pass the cache once, as `cache` or as `past_key_values`")
        kwargs['past_key_values'] = cache
    return kwargs


class MesaBlock(GradientCheckpointingLayer):
    """Pre-norm block: `x + mixer(norm(x))`, then `x + mlp(norm(x))`; the mixer is `MesaAttention`, or softmax
    `Attention` for the layers listed in `config.attn`."""

    def __init__(self, config: MesaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx

        norm_cls = RMSNorm if config.fuse_norm else nn.RMSNorm
        self.attn_norm = norm_cls(config.hidden_size, eps=config.norm_eps)
        self.attn = build_softmax_attention(config, layer_idx)
        if self.attn is None:
            self.attn = MesaAttention(
                hidden_size=config.hidden_size,
                num_heads=config.num_heads,
                head_dim=config.head_dim,
                expand_v=config.expand_v,
                mode=config.attn_mode,
                use_short_conv=config.use_short_conv,
                conv_size=config.conv_size,
                conv_bias=config.conv_bias,
                use_output_gate=config.use_output_gate,
                use_mamba_gate=config.use_mamba_gate,
                lambda_init=config.lambda_init,
                lambda_lower_bound=config.lambda_lower_bound,
                forget_gate_cap=config.forget_gate_cap,
                cg_steps=config.cg_steps,
                decode_cg_steps=config.decode_cg_steps,
                cg_tol=config.cg_tol,
                cg_init=config.cg_init,
                cg_precond=config.cg_precond,
                fp32_backward=config.fp32_backward,
                layer_idx=layer_idx,
                norm_eps=config.norm_eps,
            )
        self.mlp_norm = norm_cls(config.hidden_size, eps=config.norm_eps)
        self.mlp = MesaMLP(
            hidden_size=config.hidden_size,
            hidden_ratio=config.hidden_ratio,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            fuse_swiglu=config.fuse_swiglu,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        attnres_states=None,
        **kwargs,
    ):
        residual = hidden_states
        hidden_states = self.attn_norm(hidden_states)
        hidden_states, attentions, past_key_values = self.attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )
        if self.config.fuse_norm:
            hidden_states, residual = self.mlp_norm(hidden_states, residual, True)
        else:
            hidden_states = residual + hidden_states
            residual = hidden_states
            hidden_states = self.mlp_norm(hidden_states)
        hidden_states = self.mlp(hidden_states, **kwargs)
        hidden_states = residual + hidden_states
        return hidden_states, attentions, past_key_values, attnres_states


class MesaPreTrainedModel(FLAPreTrainedModel):

    config_class = MesaConfig
    base_model_prefix = 'model'
    supports_gradient_checkpointing = True
    _no_split_modules = ['MesaBlock']
    _supports_cache_class = True

    def set_record_cg_iters(self, enabled: bool = True) -> None:
        """Turns `record_cg_iters` on/off in every Mesa layer (see `MesaAttention`) and clears their records."""
        for module in self.modules():
            if isinstance(module, MesaAttention):
                module.record_cg_iters = enabled
                module.last_cg_iters = None

    def get_cg_iters(self) -> dict[int, torch.Tensor | None]:
        """`{layer_idx: int [B, T, H] CG iterations of the last call (None if not recorded)}` over the Mesa layers."""
        return {m.layer_idx: m.last_cg_iters for m in self.modules() if isinstance(m, MesaAttention)}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        # loading replaces Parameter objects, which drops fla's `_no_weight_decay` flags
        for module in model.modules():
            if isinstance(module, MesaAttention):
                module.mark_no_weight_decay()
        return model

    def _init_weights(self, module: nn.Module, prenorm_residual_strategy: str | None = None,
                      num_residuals_per_layer: int = 2):
        if isinstance(module, MesaAttention):
            module.mark_no_weight_decay()
            params = [module.lambda_params] + ([module.A_log, module.dt_bias] if module.use_mamba_gate else [])
            if not all(getattr(p, '_is_hf_initialized', False) for p in params):
                module.reset_mesa_parameters()
            return
        super()._init_weights(module, prenorm_residual_strategy=prenorm_residual_strategy,
                              num_residuals_per_layer=num_residuals_per_layer)


class MesaModel(MesaPreTrainedModel, FLAModel):

    def __init__(self, config: MesaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MesaBlock(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
        self.norm = (RMSNorm if config.fuse_norm else nn.RMSNorm)(config.hidden_size, eps=config.norm_eps)
        self.use_attnres = False
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None, **kwargs):
        kwargs = _take_cache_kwarg(dict(kwargs, past_key_values=past_key_values))
        if self.training and self.config.cg_steps_train_range is not None and kwargs.get('cg_steps') is None:
            # one count for every layer of this batch, fixed before the layers run, so that activation
            # checkpointing recomputes with the same count
            lo, hi = self.config.cg_steps_train_range
            kwargs['cg_steps'] = int(torch.randint(lo, hi + 1, ()).item())
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               **kwargs)


class MesaForCausalLM(MesaPreTrainedModel, FLAForCausalLM, FLAUnsupportedCacheGenerationMixin):
    """MesaNet language model. `config.final_logit_softcapping` caps the logits (`cap * tanh(logits / cap)`) before
    the loss; fla's fused losses are used for CUDA tensors only (plain `nn.CrossEntropyLoss` elsewhere)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: MesaConfig):
        super().__init__(config)
        self.model = MesaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.criterion = None
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None, labels=None,
                **kwargs):
        kwargs = _take_cache_kwarg(dict(kwargs, past_key_values=past_key_values))
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, **kwargs)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        if cap is None:
            return logits
        return cap * torch.tanh(logits / cap)

    def _compute_logits_and_loss(
        self,
        hidden_states: torch.Tensor,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor | None = 0,
        *,
        shift_labels: torch.LongTensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        fuse_linear_cross_entropy: bool | None = None,
        use_l2warp: bool | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        on_cuda = hidden_states.is_cuda
        if fuse_linear_cross_entropy is None:
            fuse_linear_cross_entropy = getattr(self.config, 'fuse_linear_cross_entropy', False)
        if use_l2warp is None:
            use_l2warp = getattr(self.config, 'use_l2warp', False)
        capped = self.config.final_logit_softcapping is not None
        fuse_linear_cross_entropy = fuse_linear_cross_entropy and on_cuda and not capped
        has_labels = labels is not None or shift_labels is not None

        loss, logits = None, None
        if not fuse_linear_cross_entropy or not has_labels:
            if has_labels or logits_to_keep is None:
                selected = hidden_states
            elif isinstance(logits_to_keep, int):
                selected = hidden_states[:, -logits_to_keep:]
            else:
                selected = hidden_states[:, logits_to_keep]
            logits = self._softcap(self.lm_head(selected))
        if not has_labels:
            return loss, logits

        reduction = 'mean' if num_items_in_batch is None else 'sum'
        criterion = self.criterion
        if criterion is None:
            if fuse_linear_cross_entropy:
                criterion = FusedLinearCrossEntropyLoss(use_l2warp=use_l2warp, reduction=reduction)
            elif self.config.fuse_cross_entropy and on_cuda:
                # in-place backward would overwrite the capped logits that tanh's backward does not need, but keep the
                # returned logits intact when capping
                criterion = FusedCrossEntropyLoss(inplace_backward=not capped, reduction=reduction)
            else:
                criterion = nn.CrossEntropyLoss(reduction=reduction)
        elif num_items_in_batch is not None:
            import copy
            criterion = copy.copy(criterion)
            criterion.reduction = 'sum'

        if shift_labels is None:
            labels = labels.to(hidden_states.device)
            shift_labels = torch.cat((labels[..., 1:], torch.full_like(labels[:, :1], criterion.ignore_index)), dim=1)
        else:
            shift_labels = shift_labels.to(hidden_states.device)
        if fuse_linear_cross_entropy:
            loss = criterion(hidden_states, shift_labels, self.lm_head.weight, self.lm_head.bias)
        else:
            loss = criterion(logits.reshape(shift_labels.numel(), -1), shift_labels.reshape(-1))
            if use_l2warp:
                loss = l2_warp(loss, logits)
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss, logits
