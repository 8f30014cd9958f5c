"""Softmax attention for the hybrid layers of Mesa models (`MesaConfig.attn`), on any device.

fla's `fla.layers.attn.Attention` runs on flash-attn only, which neither a CPU nor our GPU image has, so this module
computes the same layer with PyTorch's `scaled_dot_product_attention` (which itself takes FlashAttention kernels on
CUDA where it can). Constructor, parameters, state-dict keys, rotary convention and cache format are fla's, so
checkpoints and caches move between the two; positions differ only for right-padded batches with a cache, which
fla's layer shifts to negative positions (see `Attention.forward`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from fla.modules import RotaryEmbedding as _RotaryEmbedding
from fla.modules.rotary import rotary_embedding_ref

from fla_mesa.layers.modules import RMSNorm

__all__ = ['Attention', 'RotaryEmbedding']


class RotaryEmbedding(_RotaryEmbedding):
    """fla `RotaryEmbedding` (GPT-NeoX halves by default) with a PyTorch path for non-CUDA tensors."""

    def forward(self, q, k, seqlen_offset=0, cu_seqlens=None, max_seqlen=None, chunk_indices=None):
        if q.is_cuda:
            return super().forward(q, k, seqlen_offset=seqlen_offset, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                   chunk_indices=chunk_indices)
        if self.scale is not None:
            raise NotImplementedError("XPos (scale_base) has no CPU path")
        T = q.shape[1]
        pos = torch.arange(T, device=q.device)
        if cu_seqlens is not None:
            pos = pos - cu_seqlens[:-1].repeat_interleave(cu_seqlens.diff())
        pos = pos + (seqlen_offset[:, None] if torch.is_tensor(seqlen_offset) else seqlen_offset)  # [B, T] or [T]
        self._update_cos_sin_cache(max(int(pos.max()) + 1, max_seqlen or 0), device=q.device, dtype=q.dtype)
        # positions before a sequence's first token (left padding) index row 0: their values are never used
        cos, sin = self._cos_cached[pos.clamp(min=0)], self._sin_cached[pos.clamp(min=0)]
        return (rotary_embedding_ref(q, cos, sin, interleaved=self.interleaved),
                rotary_embedding_ref(k, cos, sin, interleaved=self.interleaved))


class Attention(nn.Module):
    """Causal softmax attention with RoPE, optional GQA, qk RMSNorm and a sliding window, as fla's `Attention`.

    `forward(hidden_states, attention_mask=None, past_key_values=None, output_attentions=False, use_cache=False,
    **kwargs) -> (o, None, past_key_values)`: `attention_mask` is a 0/1 padding mask `[B, T_total]` (keys of the
    cache included); `cu_seqlens` in kwargs packs sequences (batch 1). The cache holds the rotated keys and the values
    (`attn_state`, `[B, T, num_kv_heads * head_dim]`), trimmed to the window if there is one. Padded query
    positions give zeros.
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 32,
        num_kv_heads: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        window_size: int | None = None,
        rope_theta: float | None = 10000.,
        max_position_embeddings: int | None = None,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if hidden_size % num_heads or num_heads % self.num_kv_heads:
            raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}), and "
                             f"`num_heads` by `num_kv_heads` ({self.num_kv_heads})")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_kv_groups = num_heads // self.num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.kv_dim = self.num_kv_heads * self.head_dim
        self.qkv_bias, self.qk_norm = qkv_bias, qk_norm
        self.window_size, self.rope_theta = window_size, rope_theta
        self.max_position_embeddings, self.layer_idx = max_position_embeddings, layer_idx

        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, self.kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, self.kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, dtype=torch.float32)
            self.k_norm = RMSNorm(self.head_dim, dtype=torch.float32)
        self.rotary = RotaryEmbedding(dim=self.head_dim, base=rope_theta)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, output_attentions=False,
                use_cache=False, **kwargs):
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"`attention_mask`: expected a 0/1 padding mask [batch, seq_len], got shape "
                             f"{tuple(attention_mask.shape)}")
        T = hidden_states.shape[1]
        cu_seqlens = kwargs.get('cu_seqlens')
        q = self.q_proj(hidden_states).unflatten(-1, (-1, self.head_dim))
        k = self.k_proj(hidden_states).unflatten(-1, (-1, self.head_dim))
        v = self.v_proj(hidden_states).unflatten(-1, (-1, self.head_dim))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)

        # with a cache, positions continue from it, and a sequence's leading (left) padding is discounted so that
        # its first token is at 0, as in fla's layer; fla's discount, `length - mask width`, is also taken by right
        # padding, which then shifts whole sequences to negative positions
        offset, max_seqlen, cached_len = 0, T, 0
        if past_key_values is not None:
            offset = cached_len = past_key_values.get_seq_length(self.layer_idx)
            max_seqlen = T + offset
            if cu_seqlens is None and attention_mask is not None:
                offset = offset - (attention_mask.cumsum(-1) == 0).sum(-1)
                max_seqlen = T + int(offset.max())
        if self.max_position_embeddings is not None:
            max_seqlen = max(max_seqlen, self.max_position_embeddings)
        q, k = self.rotary(q, k, seqlen_offset=offset, max_seqlen=max_seqlen, cu_seqlens=cu_seqlens)

        if past_key_values is not None:
            has_content = cached_len > 0
            if cu_seqlens is not None and has_content:
                raise ValueError("`cu_seqlens` cannot be combined with a cache that has content")
            cached = past_key_values[self.layer_idx]['attn_state'] if has_content else None
            k_all, v_all = past_key_values.update(
                attn_state=(k.flatten(-2), v.flatten(-2)), layer_idx=self.layer_idx, offset=T,
                cache_kwargs=dict(window_size=self.window_size))['attn_state']
            if self.window_size is not None and T > 1 and cached is not None:
                k_all, v_all = (torch.cat([c, n.flatten(-2)], 1) for c, n in zip(cached, (k, v)))
            if has_content:
                k, v = k_all.unflatten(-1, (-1, self.head_dim)), v_all.unflatten(-1, (-1, self.head_dim))

        o = self._attend(q, k, v, attention_mask, cu_seqlens)
        return self.o_proj(o.flatten(-2)), None, past_key_values

    def _attend(self, q, k, v, attention_mask, cu_seqlens):
        """softmax(q k^T / sqrt(d) + mask) v over [B, T, H, d]; the queries are the last T of the keys' positions."""
        B, T, S = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        if self.num_kv_groups > 1:
            k, v = (x.repeat_interleave(self.num_kv_groups, dim=1) for x in (k, v))
        if attention_mask is None and cu_seqlens is None and self.window_size is None and S == T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        i = torch.arange(S - T, S, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        allowed = j <= i
        if self.window_size is not None:
            allowed = allowed & (j > i - self.window_size)
        allowed = allowed.expand(B, 1, T, S)
        query_ok = None
        if cu_seqlens is not None:
            seq = torch.arange(len(cu_seqlens) - 1, device=q.device).repeat_interleave(cu_seqlens.diff())
            allowed = allowed & (seq[S - T:, None] == seq[None, :])
        if attention_mask is not None:
            keys = attention_mask[:, -S:].bool()
            allowed = allowed & keys[:, None, None, :]
            query_ok = attention_mask[:, -T:].bool()
        # a padded query may see no key at all: let it see every key, then zero its output
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)
        return o if query_ok is None else o * query_ok[:, :, None, None].to(o.dtype)
