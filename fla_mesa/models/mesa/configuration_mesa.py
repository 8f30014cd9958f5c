"""Configuration of MesaNet language models (arXiv 2506.05233)."""

from __future__ import annotations

from fla.models.configuration_utils import (
    AttentionConfig,
    AttentionConfigBase,
    validate_loss_config,
)
from transformers.configuration_utils import PreTrainedConfig


class MesaConfig(AttentionConfigBase, PreTrainedConfig):
    r"""Configuration of a MesaNet model: pre-norm blocks of a Mesa layer (`MesaAttention`) and a SwiGLU MLP.

    The layer knobs (`num_heads`, `head_dim`, `expand_v`, `use_output_gate`, `use_mamba_gate`, `use_short_conv`,
    `conv_size`, `conv_bias`, `lambda_init`, `lambda_lower_bound`, `forget_gate_cap`, `cg_steps`,
    `decode_cg_steps`, `cg_tol`, `cg_init`, `cg_precond`, `fp32_backward`, `attn_mode`) are passed to every Mesa
    layer; see `MesaAttention`.

    Model knobs as fla's models (`hidden_ratio`/`intermediate_size` of the MLP, `fuse_norm`, `fuse_swiglu`,
    `fuse_cross_entropy`, `fuse_linear_cross_entropy`: fused Triton kernels, used for CUDA tensors only), plus:
        attn (dict | list | None): fla's hybrid spec, e.g. `{"layers": [1, 3], "num_heads": 8}`: those layers are
            softmax attention (`fla_mesa.layers.attn.Attention`: fla's layer, parameters and cache, on PyTorch's SDPA).
        final_logit_softcapping (float | None): logits = cap * tanh(logits / cap) (the paper: 30). Default: None.
        cg_steps_train_range (list[int] | None): `[lo, hi]`: in training mode, each forward draws one number of CG
            steps uniformly from it (torch's global generator) for every Mesa layer, instead of `cg_steps`; the
            paper's open question (appendix J: "sample the number of CG steps during training"). The gradients stay
            those of the exact solve (implicit differentiation), not of the unrolled steps, so they are exact only
            where the drawn count has converged. Evaluation and decoding use `cg_steps` / `decode_cg_steps`.
            Default: None (off).
        tie_word_embeddings (bool): tie the output head to the input embeddings (the paper ties). Default: True.
    """

    model_type = 'mesa'
    keys_to_ignore_at_inference = ['past_key_values']

    def __init__(
        self,
        attn_mode: str = 'chunk',
        hidden_size: int = 2048,
        num_heads: int = 16,
        head_dim: int | None = 128,
        expand_v: float = 1.0,
        use_output_gate: bool = False,
        use_mamba_gate: bool = False,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        lambda_init: float = 1.0,
        lambda_lower_bound: float = 0.25,
        forget_gate_cap: float | None = 0.9975,
        cg_steps: int = 30,
        decode_cg_steps: int = 30,
        cg_tol: float | None = None,
        cg_init: str = 'jacobi',
        cg_precond: str = 'none',
        fp32_backward: bool = True,
        cg_steps_train_range: tuple[int, int] | None = None,
        max_position_embeddings: int = 2048,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = 'swish',
        num_hidden_layers: int = 24,
        norm_eps: float = 1e-6,
        attn: AttentionConfig = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        final_logit_softcapping: float | None = None,
        fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        fuse_linear_cross_entropy: bool = False,
        use_l2warp: bool = False,
        vocab_size: int = 32000,
        **kwargs,
    ):
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.expand_v = expand_v
        self.use_output_gate = use_output_gate
        self.use_mamba_gate = use_mamba_gate
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.conv_bias = conv_bias
        self.lambda_init = lambda_init
        self.lambda_lower_bound = lambda_lower_bound
        self.forget_gate_cap = forget_gate_cap
        self.cg_steps = cg_steps
        self.decode_cg_steps = decode_cg_steps
        self.cg_tol = cg_tol
        self.cg_init = cg_init
        self.cg_precond = cg_precond
        self.fp32_backward = fp32_backward
        self.cg_steps_train_range = cg_steps_train_range
        self.max_position_embeddings = max_position_embeddings
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.norm_eps = norm_eps
        self.attn = attn
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.final_logit_softcapping = final_logit_softcapping
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size

        validate_loss_config(fuse_cross_entropy=fuse_cross_entropy, fuse_linear_cross_entropy=fuse_linear_cross_entropy)
        if cg_steps_train_range is not None:
            r = cg_steps_train_range
            if not (isinstance(r, (list, tuple)) and len(r) == 2 and
                    all(isinstance(n, int) and not isinstance(n, bool) for n in r) and 0 <= r[0] <= r[1]):
                raise ValueError(f"MesaConfig: cg_steps_train_range must be None or a pair [lo, hi] of ints with "
                                 f"0 <= lo <= hi, got {r!r}")
            self.cg_steps_train_range = list(r)
        if final_logit_softcapping is not None:
            if not final_logit_softcapping > 0:
                raise ValueError(f"MesaConfig: final_logit_softcapping must be None or > 0, got "
                                 f"{final_logit_softcapping!r}")
            if fuse_linear_cross_entropy:
                raise ValueError("MesaConfig: final_logit_softcapping cannot be combined with "
                                 "fuse_linear_cross_entropy (the fused loss never materialises the logits to cap)")

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
