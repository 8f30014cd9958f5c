"""Narrower autotune spaces for the fla kernels that Mesa layers and models launch, on Hopper GPUs.

fla autotunes its kernels over up to 48 launch configurations for every new key (the key includes the dtype of every
tensor argument), and on a fresh machine each configuration is a Triton compilation of 0.5 to 9 s: a 6-layer Mesa
model's first training step spent over 300 s in fla's searches (fused RMSNorm, SwiGLU, short convolution, L2 norm and
the chunk primitives; benchmarks/RESULTS.md). On the first call of a fla_mesa op or module on an NVIDIA Hopper GPU,
the kernels named in `HOPPER_SPACES` choose only among the configurations listed there, the winners of fla's full
searches measured on an H200 (`benchmarks/lm/first_step.py --autotune-report`), at the head and feature sizes where
they were measured, for the rest of the process.

This changes how the same fla kernels are tuned for every other fla model in the process too (launch configurations
only: each configuration computes the same function, up to rounding). `FLA_MESA_FULL_AUTOTUNE=1` in the environment
turns it off; on other GPUs fla's full spaces are searched.
"""

from __future__ import annotations

import functools
import importlib
import os


def _sig(num_warps: int, num_stages: int = 3, **kwargs) -> tuple:
    return tuple(sorted(kwargs.items())), num_warps, num_stages


def config_signature(config) -> tuple:
    """A `triton.Config` as (sorted kwargs, num_warps, num_stages), the form of `HOPPER_SPACES`' entries."""
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


# chunk_fwd_kernel_h: for every key measured (K = V = 16 and 128, float32 and bf16) the best of these is within 2% of
# the full search's winner; chunk_bwd_kernel_dh was measured at K = V = 16 and 128
_CHUNK_H = frozenset(_sig(w, s, BK=bk, BV=bv) for bk, bv, w, s in [(32, 32, 4, 4), (32, 32, 8, 3), (64, 64, 2, 2),
                                                                    (32, 64, 4, 3)])
_W4 = frozenset({_sig(4, 2), _sig(4, 3), _sig(4, 4)})


def _sizes(*sizes: int) -> frozenset:
    return frozenset(sizes)


# '<fla module>.<kernel>': (the configurations kept, each the winner of at least one full search measured; the head
# or feature sizes, the kernel's K, V or D arguments, at which they were measured). Other sizes search fla's full
# space: a winner at 128 can exceed the shared memory at 256 (chunk_bwd_kernel_dqkwg), and where these spaces applied
# at every size up to 128, fla's chunk_simple_gla at D = 64 timed 1.25x (fwd) and 1.34x (fwd+bwd) its earlier figures
# while fla's chunk_mesa_net, whose kernels are not listed, timed the same.
HOPPER_SPACES: dict[str, tuple[frozenset, frozenset]] = {
    'fla.ops.common.chunk_h.chunk_fwd_kernel_h': (_CHUNK_H, _sizes(16, 128)),
    'fla.ops.common.chunk_h.chunk_bwd_kernel_dh': (_CHUNK_H, _sizes(16, 128)),
    'fla.ops.common.chunk_o.chunk_fwd_kernel_o': (frozenset({_sig(2, BK=32, BV=32), _sig(4, BK=64, BV=64)}),
                                                  _sizes(128)),
    'fla.ops.common.chunk_o.chunk_bwd_kernel_dqkwg': (_W4, _sizes(128)),
    'fla.ops.common.chunk_o.chunk_bwd_kernel_dv': (_W4, _sizes(128)),
    'fla.ops.utils.cumsum.chunk_local_cumsum_scalar_kernel': (frozenset({_sig(1), _sig(2)}), _sizes()),  # no K, V, D
    'fla.modules.norm.layernorm.layer_norm_fwd_kernel': (frozenset({_sig(4, BT=32), _sig(8, BT=32), _sig(8, BT=64)}),
                                                         _sizes(128, 512)),
    'fla.modules.norm.layernorm.layer_norm_bwd_kernel': (frozenset({_sig(8, BT=32)}), _sizes(512)),
    'fla.modules.norm.fused_norm_gate.layer_norm_gated_fwd_kernel': (frozenset({_sig(4, BT=16)}), _sizes(128)),
    'fla.modules.norm.l2norm.l2norm_fwd_kernel': (frozenset({_sig(1, BT=8), _sig(1, BT=32), _sig(16, BT=32)}),
                                                  _sizes(128)),
    'fla.modules.norm.l2norm.l2norm_bwd_kernel': (frozenset({_sig(8, BT=16), _sig(2, BT=8)}), _sizes(128)),
    'fla.modules.causal_conv1d.ops.causal_conv1d_fwd_kernel': (frozenset({_sig(4, BD=32)}), _sizes(512, 1536)),
    'fla.modules.causal_conv1d.ops.causal_conv1d_bwd_kernel': (frozenset({_sig(4, BD=32)}), _sizes(512)),
    'fla.modules.activations.ops.swiglu_fwd_kernel': (frozenset({_sig(2, B=512)}), _sizes(1536)),
    'fla.modules.activations.ops.swiglu_fwdbwd_kernel': (frozenset({_sig(16, B=1024)}), _sizes(1536)),
}
SIZE_ARGS = ('K', 'V', 'D')

_narrowed = False


def _autotuner(kernel):
    """The `triton.runtime.autotuner.Autotuner` inside a kernel's decorators, or None."""
    from triton.runtime.autotuner import Autotuner
    while kernel is not None and not isinstance(kernel, Autotuner):
        kernel = getattr(kernel, 'fn', None)
    return kernel


def subset(configs: list, kept: frozenset) -> list:
    """The configurations of fla's list whose signature is in `kept` (all of them if none is)."""
    chosen = [c for c in configs if config_signature(c) in kept]
    return chosen or list(configs)


def narrow(tuner, kept: frozenset, sizes: frozenset) -> None:
    """Makes `tuner` search `subset(configs, kept)` for the keys whose K, V and D arguments are all in `sizes`."""
    prune = tuner.prune_configs

    def prune_configs(kwargs):
        configs = prune(kwargs)
        args = {**tuner.nargs, **kwargs}
        if all(args[n] in sizes for n in SIZE_ARGS if isinstance(args.get(n), int)):
            configs = subset(configs, kept)
        return configs
    tuner.prune_configs = prune_configs


def hopper_tuners() -> list:
    """(name, Autotuner) for every kernel of `HOPPER_SPACES` that this fla version has."""
    found = []
    for name in HOPPER_SPACES:
        module, kernel = name.rsplit('.', 1)
        tuner = _autotuner(getattr(importlib.import_module(module), kernel, None))
        if tuner is not None:
            found.append((name, tuner))
    return found


@functools.lru_cache(maxsize=None)
def _is_hopper(device) -> bool:
    """Asked on every CUDA call of the modules until narrowed (forever on other GPUs): memoised per device."""
    import torch
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] == 9


def _enabled(device) -> bool:
    return os.environ.get('FLA_MESA_FULL_AUTOTUNE', '0') != '1' and _is_hopper(device)


def narrow_fla_autotune(device) -> None:
    """From now on in this process, the kernels of `HOPPER_SPACES` autotune over their listed configurations (at the
    sizes measured), if `device` is an NVIDIA Hopper GPU and `FLA_MESA_FULL_AUTOTUNE` is not 1. Cheap after the
    first call."""
    global _narrowed
    if _narrowed or not _enabled(device):
        return
    for name, tuner in hopper_tuners():
        narrow(tuner, *HOPPER_SPACES[name])
    _narrowed = True
