"""The Mesa layer of MesaNet (arXiv 2506.05233), built on the `fla_mesa.ops` kernels."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from fla.layers.utils import get_layer_cache, pad_input, repad_hidden_states, unpad_hidden_states, update_layer_cache

from fla_mesa.layers.modules import FusedRMSNormGated, RMSNorm, ShortConvolution
from fla_mesa.ops import chunk_mesa, fused_recurrent_mesa
from fla_mesa.ops.utils import CG_INITS, CG_PRECONDS
from fla_mesa.ops.utils import forget_gate_cap as apply_forget_gate_cap

if TYPE_CHECKING:
    from fla.models.cache_utils import Cache

MODES = ('chunk', 'fused_recurrent')
# longest chunk (tokens per sequence) that continues a cached state through the recurrent kernel
MAX_DECODE_LEN = 64


def _check_steps(name: str, steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{name} must be an int >= 0, got {steps!r}")
    return steps


class MesaAttention(nn.Module):
    r"""The Mesa layer (MesaNet, arXiv 2506.05233): a linear-cost sequence mixer whose output at step t is
    `o_t = G_t (H_t + diag(lambda))^{-1} q_t`, the prediction of the ridge-regression fit of values on keys seen so
    far, with the linear system solved by conjugate gradient (CG).

        H_t = gamma_t H_{t-1} + beta_t k_t k_t^T,    G_t = gamma_t G_{t-1} + beta_t v_t k_t^T

    Inputs: q, k, v projections; causal short convolutions + SiLU on q and k (as the paper; v is a plain
    projection); q and k L2-normalised (inside the kernel); `beta = sigmoid(b_proj(x))`; forget gate
    `g = log(gamma) = logsigmoid(a_proj(x))` (or, with `use_mamba_gate`, fla's Mamba-style
    `g = -exp(A_log) * softplus(a_proj(x) + dt_bias)`), then the paper's cap against runs of one repeated token
    `gamma <- gamma * (1 - (1 - forget_gate_cap) * beta^2)` (appendix G.5). `lambda = softplus(lambda_params) +
    lambda_lower_bound`, one value per head and key channel, initialised to `lambda_init`. Output: per-head RMSNorm
    (gated RMSNorm with `use_output_gate`), then `o_proj`.

    Args:
        hidden_size (int): model width. Default: 2048.
        num_heads (int): number of heads; must divide `hidden_size`. Default: 16.
        head_dim (int): key (and query) dim per head; `None` gives `hidden_size // num_heads`. Default: 128.
        expand_v (float): value head dim = `head_dim * expand_v`. Default: 1.
        mode (str): `'chunk'` (training and prefill) or `'fused_recurrent'` (token-by-token kernel, used without
            autograd only). Whatever the mode, continuing a cached state with at most 64 new tokens per sequence
            without autograd (decoding) uses `fused_recurrent_mesa`. Default: `'chunk'`.
        use_short_conv (bool): causal convolutions on q and k. Default: `True`.
        conv_size (int): their width. Default: 4.
        conv_bias (bool): Default: `False`.
        use_output_gate (bool): gated output RMSNorm with a `g_proj` branch. Default: `False` (the paper).
        use_mamba_gate (bool): Mamba-style forget gate with `A_log` and `dt_bias`; at initialisation its gamma has
            median 0.93 over heads (quartiles 0.79 and 0.98), where the paper's sigmoid gate starts at 0.5 (a
            one-token memory). On a small MQAR it removed a plateau of about 1000 steps, and on MQAR at vocab
            8192 and L=256 (H100) Mesa reached 0.999 with it where the default gate stayed at chance; on byte-level
            language modelling it was worse at 0.56M parameters (by 0.29 nats after 500 steps, 0.04 after 1500)
            and better at 27M (0.854 against 0.871 after 1000 steps, one seed) (`benchmarks/RESULTS.md`).
            Default: `False` (the paper's gate).
        lambda_init (float): initial value of lambda. Default: 1.0.
        lambda_lower_bound (float): lower bound of lambda, > 0. Default: 0.25.
        forget_gate_cap (float | None): the cap `b_gamma` of appendix G.5 (`None` disables). Default: 0.9975.
        cg_steps (int): CG iterations for training and prefill. Default: 30.
        decode_cg_steps (int): CG iterations when continuing a cached state (decoding). Default: 30.
        cg_tol (float | None): stop CG once `||r_k|| <= cg_tol * ||r_0||` (at most `cg_steps`); `None` stops each
            token at the floor of the products' precision (`2^-16 * ||r_0||` for the CUDA chunk kernel's tf32 or
            float16 products, `eps * ||r_0||` with the compute dtype's eps elsewhere). Default: `None`.
        cg_init (str): CG start, `'jacobi'` (`q / diag(H + Lambda)`, the paper's) or `'zero'`; the backward's solve
            starts from it only under `cg_tol` (`chunk_mesa`). Default: `'jacobi'`.
        cg_precond (str): `'jacobi'` preconditions CG with `diag(H + Lambda)` (fewer iterations once lambda differs
            across channels, `benchmarks/RESULTS.md`); `'none'`, the paper's plain CG. Default: `'none'`.
        fp32_backward (bool): `chunk_mesa`'s option: float32 products in the backward's GLA passes on CUDA, for
            gradients more accurate than fla's MesaNet's; `False` (bf16 operands) takes about the same time (0.97-1.01x
            the op's forward+backward at D=128 on an H100 and an H200) and more memory, with bf16 gradient errors
            1.3-1.8x fla's.
            Default: `True`.
        layer_idx (int): index of the layer in the model (needed with a cache). Default: `None`.
        norm_eps (float): epsilon of the output norm. Default: 1e-5.

    `forward(..., cg_steps=n)` runs one call (not decoding) with `n` CG steps instead of `cg_steps`; `MesaModel` uses
    it to train with a random number of steps per batch (`MesaConfig.cg_steps_train_range`).

    Attributes:
        record_cg_iters (bool): when `True`, every call asks the kernel how many CG iterations each token used and
            stores them (int tensor `[B, T, H]`, 0 at padding) in `last_cg_iters`. Default: `False`.
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 16,
        head_dim: int | None = 128,
        expand_v: float = 1.0,
        mode: str = 'chunk',
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        use_output_gate: bool = False,
        use_mamba_gate: bool = False,
        lambda_init: float = 1.0,
        lambda_lower_bound: float = 0.25,
        forget_gate_cap: float | None = 0.9975,
        cg_steps: int = 30,
        decode_cg_steps: int = 30,
        cg_tol: float | None = None,
        cg_init: str = 'jacobi',
        cg_precond: str = 'none',
        fp32_backward: bool = True,
        layer_idx: int | None = None,
        norm_eps: float = 1e-5,
        **kwargs,
    ) -> None:
        super().__init__()
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"MesaAttention: num_heads must be a positive int, got {num_heads!r}")
        if hidden_size % num_heads != 0:
            raise ValueError(f"MesaAttention: hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if head_dim is None:
            head_dim = hidden_size // num_heads
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"MesaAttention: head_dim must be a positive int, got {head_dim!r}")
        head_v_dim = head_dim * expand_v
        if not (expand_v > 0 and math.isclose(head_v_dim, round(head_v_dim), rel_tol=1e-6)):
            raise ValueError(f"MesaAttention: head_dim * expand_v = {head_dim} * {expand_v} is not a positive integer")
        if mode not in MODES:
            raise ValueError(f"MesaAttention: unknown mode {mode!r}; expected one of {MODES}")
        if cg_init not in CG_INITS:
            raise ValueError(f"MesaAttention: unknown cg_init {cg_init!r}; expected one of {CG_INITS}")
        if cg_precond not in CG_PRECONDS:
            raise ValueError(f"MesaAttention: unknown cg_precond {cg_precond!r}; expected one of {CG_PRECONDS}")
        if not lambda_lower_bound > 0:
            raise ValueError(f"MesaAttention: lambda_lower_bound must be > 0 (H + Lambda must stay positive definite), "
                             f"got {lambda_lower_bound!r}")
        if not lambda_init > lambda_lower_bound:
            raise ValueError(f"MesaAttention: lambda_init={lambda_init!r} must be > lambda_lower_bound="
                             f"{lambda_lower_bound!r} (lambda = softplus(param) + lower bound)")
        if forget_gate_cap is not None and not 0 < forget_gate_cap <= 1:
            raise ValueError(f"MesaAttention: forget_gate_cap must be None or in (0, 1], got {forget_gate_cap!r}")
        _check_steps('MesaAttention: cg_steps', cg_steps)
        _check_steps('MesaAttention: decode_cg_steps', decode_cg_steps)
        if cg_tol is not None and not (0 < cg_tol < 1):
            raise ValueError(f"MesaAttention: cg_tol must be None or in (0, 1), got {cg_tol!r}")
        if conv_size < 1:
            raise ValueError(f"MesaAttention: conv_size must be >= 1, got {conv_size!r}")

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.expand_v = expand_v
        self.head_k_dim = head_dim
        self.head_v_dim = int(round(head_v_dim))
        self.key_dim = num_heads * self.head_k_dim
        self.value_dim = num_heads * self.head_v_dim
        self.mode = mode
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.conv_bias = conv_bias
        self.use_output_gate = use_output_gate
        self.use_mamba_gate = use_mamba_gate
        self.lambda_init = lambda_init
        self.lambda_lower_bound = lambda_lower_bound
        self.forget_gate_cap = forget_gate_cap
        self.cg_steps = cg_steps
        self.decode_cg_steps = decode_cg_steps
        self.cg_tol = cg_tol
        self.cg_init = cg_init
        self.cg_precond = cg_precond
        self.fp32_backward = fp32_backward
        self.layer_idx = layer_idx
        self.norm_eps = norm_eps
        self.record_cg_iters = False
        self.last_cg_iters = None

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=not use_mamba_gate)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=True)

        if use_mamba_gate:
            self.A_log = nn.Parameter(torch.empty(num_heads, dtype=torch.float32))
            self.dt_bias = nn.Parameter(torch.empty(num_heads, dtype=torch.float32))

        self.lambda_params = nn.Parameter(torch.empty(num_heads, self.head_k_dim, dtype=torch.float32))
        self.mark_no_weight_decay()

        if use_short_conv:
            self.q_conv1d = ShortConvolution(hidden_size=self.key_dim, kernel_size=conv_size, bias=conv_bias,
                                             activation='silu')
            self.k_conv1d = ShortConvolution(hidden_size=self.key_dim, kernel_size=conv_size, bias=conv_bias,
                                             activation='silu')
        else:
            warnings.warn("MesaAttention: use_short_conv=False; the paper uses short convolutions on q and k.")
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = FusedRMSNormGated(self.head_v_dim, eps=norm_eps, activation='swish')
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps, dtype=torch.float32)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.reset_mesa_parameters()

    def mark_no_weight_decay(self) -> None:
        """Flags lambda (and A_log, dt_bias) with `_no_weight_decay = True`, as fla does; loaders that replace the
        Parameter objects (transformers' `from_pretrained`) drop the flag, so `MesaPreTrainedModel` calls this again."""
        for p in (self.lambda_params, getattr(self, 'A_log', None), getattr(self, 'dt_bias', None)):
            if p is not None:
                p._no_weight_decay = True

    @torch.no_grad()
    def reset_mesa_parameters(self) -> None:
        """(Re)initialises lambda to exactly `lambda_init` and the Mamba-style gate parameters (fla's recipe)."""
        if self.lambda_params.device.type == 'meta':
            return
        # inverse softplus, computed in float64; softplus(p) + lower bound == lambda_init in float32
        p = torch.tensor(self.lambda_init - self.lambda_lower_bound, dtype=torch.float64).expm1().log()
        self.lambda_params.fill_(p.item())
        if self.use_mamba_gate:
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            dt = dt.clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, head_v_dim={self.head_v_dim}, mode={self.mode}, "
                f"cg_steps={self.cg_steps}, decode_cg_steps={self.decode_cg_steps}, cg_tol={self.cg_tol}, "
                f"cg_init={self.cg_init}, cg_precond={self.cg_precond}, forget_gate_cap={self.forget_gate_cap}, "
                f"lambda_lower_bound={self.lambda_lower_bound}")

    def get_lambda(self) -> torch.Tensor:
        """lambda `[H, K]`, float32."""
        return F.softplus(self.lambda_params.float()) + self.lambda_lower_bound

    def get_gates(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(g, beta)`, float32 `[..., H]`: the capped log forget gate and the input gate."""
        beta = self.b_proj(hidden_states).float().sigmoid()
        a = self.a_proj(hidden_states).float()
        if self.use_mamba_gate:
            g = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())
        else:
            g = F.logsigmoid(a)
        g = apply_forget_gate_cap(g, beta, self.forget_gate_cap)
        return g, beta

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, None, Cache | None]:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "Expected attention_mask as a 0-1 matrix with shape [batch_size, seq_len] for padding purposes "
                "(0 indicating padding). Arbitrary attention masks of shape [batch_size, seq_len, seq_len] are not "
                f"allowed; got shape {tuple(attention_mask.shape)}.",
            )
        batch_size, q_len, _ = hidden_states.shape
        last_state = get_layer_cache(self, past_key_values)

        cu_seqlens = kwargs.get('cu_seqlens')
        hidden_states, indices, cu_seqlens = unpad_hidden_states(hidden_states, cu_seqlens, attention_mask, q_len)
        num_seqs = batch_size if cu_seqlens is None else len(cu_seqlens) - 1

        recurrent_state = None if last_state is None else last_state['recurrent_state']
        # continuing a cached state with a few tokens: decoding
        is_decoding = recurrent_state is not None and q_len <= MAX_DECODE_LEN
        use_recurrent = not torch.is_grad_enabled() and (is_decoding or self.mode == 'fused_recurrent')
        cg_steps = self.cg_steps if kwargs.get('cg_steps') is None else \
            _check_steps('MesaAttention.forward: cg_steps', kwargs['cg_steps'])
        if is_decoding:
            cg_steps = self.decode_cg_steps

        conv_state_q, conv_state_k = None, None
        if self.use_short_conv:
            if last_state is not None and last_state['conv_state'] is not None:
                conv_state_q, conv_state_k = last_state['conv_state']
            q, conv_state_q = self.q_conv1d(x=self.q_proj(hidden_states), cache=conv_state_q,
                                            output_final_state=use_cache, cu_seqlens=cu_seqlens)
            k, conv_state_k = self.k_conv1d(x=self.k_proj(hidden_states), cache=conv_state_k,
                                            output_final_state=use_cache, cu_seqlens=cu_seqlens)
        else:
            q = F.silu(self.q_proj(hidden_states))
            k = F.silu(self.k_proj(hidden_states))
        v = self.v_proj(hidden_states)

        q = rearrange(q, '... (h d) -> ... h d', d=self.head_k_dim)
        k = rearrange(k, '... (h d) -> ... h d', d=self.head_k_dim)
        v = rearrange(v, '... (h d) -> ... h d', d=self.head_v_dim)
        g, beta = self.get_gates(hidden_states)
        lamb = self.get_lambda()

        if recurrent_state is not None and recurrent_state[0].shape[0] != num_seqs:
            raise ValueError(f"MesaAttention: the cached state holds {recurrent_state[0].shape[0]} sequences but the "
                             f"input has {num_seqs}")

        # lamb > 0 and g <= 0 by construction: the ops' value checks would wait for the device every call
        cg_kwargs = dict(cg_steps=cg_steps, cg_tol=self.cg_tol, cg_init=self.cg_init, cg_precond=self.cg_precond,
                         initial_state=recurrent_state,
                         output_final_state=use_cache, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True,
                         check_values=False)
        if not use_recurrent:
            cg_kwargs['fp32_backward'] = self.fp32_backward
        op = fused_recurrent_mesa if use_recurrent else chunk_mesa
        o, recurrent_state, *cg_iters = op(q, k, v, g, beta, lamb, return_cg_iters=self.record_cg_iters, **cg_kwargs)
        if self.record_cg_iters:
            cg_iters = cg_iters[0]
            if indices is not None:
                cg_iters = pad_input(cg_iters.squeeze(0), indices, batch_size, q_len)
            self.last_cg_iters = cg_iters

        update_layer_cache(
            self,
            past_key_values,
            recurrent_state=recurrent_state,
            conv_state=(conv_state_q, conv_state_k) if self.use_short_conv else None,
            offset=q_len,
        )

        o = o.to(hidden_states.dtype)
        if self.use_output_gate:
            gate = rearrange(self.g_proj(hidden_states), '... (h d) -> ... h d', d=self.head_v_dim)
            o = self.o_norm(o, gate)
        else:
            o = self.o_norm(o)
        o = rearrange(o, '... h d -> ... (h d)')
        o = self.o_proj(o)
        o = repad_hidden_states(o, indices, batch_size, q_len)
        return o, None, past_key_values
