"""Narrower autotune spaces for two of fla's chunk-state kernels while `chunk_mesa` calls them on Hopper.

fla autotunes `chunk_fwd_kernel_h` and `chunk_bwd_kernel_dh` over 48 launch configurations each (BK, BV in {32, 64},
1 to 8 warps, 2 to 4 stages) for every new key, and the key includes the dtype of every tensor argument. One Mesa
layer's forward and backward reach four or five such keys per head size (float32 states in the forward, the input
dtype in fla's GLA backward). In our first GPU runs (one model's first training step, then the layer tests) the
Triton cache ended up holding 289 compiled variants of the first kernel and 93 of the second. While our ops run on
an NVIDIA Hopper GPU, these two kernels choose only among `HOPPER_CONFIGS`; elsewhere, or with
`FLA_MESA_FULL_AUTOTUNE=1` in the environment, fla's full space is searched.

fla's autotuner remembers its choice per key for the process, so a later call of the same kernel with the same key
by another fla op reuses the configuration picked here.
"""

from __future__ import annotations

import contextlib
import os

# (BK, BV, num_warps, num_stages). From fla's full searches on an H200 (benchmarks/RESULTS.md): for every key of
# chunk_fwd_kernel_h measured (K = V = 16 and 128, float32 and bf16) the best of these is within 2% of the winner;
# chunk_bwd_kernel_dh was measured at K = V = 16 only, where the best of these is 7% slower than the winner
HOPPER_CONFIGS = frozenset({(32, 32, 4, 4), (32, 32, 8, 3), (64, 64, 2, 2), (32, 64, 4, 3)})


def _autotuner(kernel):
    """The `triton.runtime.autotuner.Autotuner` inside a kernel's decorators, or None."""
    from triton.runtime.autotuner import Autotuner
    while kernel is not None and not isinstance(kernel, Autotuner):
        kernel = getattr(kernel, 'fn', None)
    return kernel


def hopper_subset(configs: list) -> list:
    """The configurations of fla's list that are in `HOPPER_CONFIGS` (all of them if none is)."""
    kept = [c for c in configs
            if (c.kwargs.get('BK'), c.kwargs.get('BV'), c.num_warps, c.num_stages) in HOPPER_CONFIGS]
    return kept or list(configs)


def _enabled(device) -> bool:
    if os.environ.get('FLA_MESA_FULL_AUTOTUNE', '0') == '1':
        return False
    import torch
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] == 9


@contextlib.contextmanager
def narrow_fla_autotune(device, enabled: bool | None = None):
    """Within the block, fla's `chunk_fwd_kernel_h`/`chunk_bwd_kernel_dh` autotune over `hopper_subset` of their
    configurations when `enabled` (default: on Hopper unless `FLA_MESA_FULL_AUTOTUNE=1`)."""
    if not (_enabled(device) if enabled is None else enabled):
        yield
        return
    from fla.ops.common import chunk_h
    tuners = [t for t in (_autotuner(chunk_h.chunk_fwd_kernel_h), _autotuner(chunk_h.chunk_bwd_kernel_dh)) if t]
    saved = [t.configs for t in tuners]
    try:
        for t in tuners:
            t.configs = hopper_subset(t.configs)
        yield
    finally:
        for t, configs in zip(tuners, saved):
            t.configs = configs
