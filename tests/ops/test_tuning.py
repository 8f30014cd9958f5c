"""fla_mesa.ops.tuning: the narrowed autotune space of fla's chunk-state kernels, and that it is put back."""

import pytest
import triton
from fla.ops.common import chunk_h

from fla_mesa.ops.tuning import HOPPER_CONFIGS, _autotuner, hopper_subset, narrow_fla_autotune

KERNELS = (chunk_h.chunk_fwd_kernel_h, chunk_h.chunk_bwd_kernel_dh)


def signature(c):
    return c.kwargs.get('BK'), c.kwargs.get('BV'), c.num_warps, c.num_stages


@pytest.mark.parametrize('kernel', KERNELS, ids=['fwd_h', 'bwd_dh'])
def test_subset_is_fla_configurations_in_the_hopper_set(kernel):
    full = _autotuner(kernel).configs
    kept = hopper_subset(full)
    assert all(c in full for c in kept)
    ours = {signature(c) for c in full} & HOPPER_CONFIGS
    assert {signature(c) for c in kept} == (ours or {signature(c) for c in full})


@pytest.mark.gpu
@pytest.mark.parametrize('kernel', KERNELS, ids=['fwd_h', 'bwd_dh'])
def test_fla_offers_every_hopper_configuration_on_a_gpu(kernel):
    assert {signature(c) for c in hopper_subset(_autotuner(kernel).configs)} == set(HOPPER_CONFIGS)


def test_subset_of_a_foreign_list_is_the_whole_list():
    configs = [triton.Config({'BT': 16}, num_warps=4), triton.Config({'BT': 32}, num_warps=8)]
    assert hopper_subset(configs) == configs


def test_narrowing_applies_inside_the_block_only():
    tuners = [_autotuner(k) for k in KERNELS]
    before = [list(t.configs) for t in tuners]
    with narrow_fla_autotune(None, enabled=True):
        assert [t.configs for t in tuners] == [hopper_subset(b) for b in before]
    assert [t.configs for t in tuners] == before
    with pytest.raises(RuntimeError), narrow_fla_autotune(None, enabled=True):
        raise RuntimeError("the op failed")
    assert [t.configs for t in tuners] == before
    with narrow_fla_autotune(None, enabled=False):
        assert [t.configs for t in tuners] == before
