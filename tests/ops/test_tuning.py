"""fla_mesa.ops.tuning: the narrowed autotune spaces of the fla kernels that Mesa models launch."""

import pytest
import torch
import triton

from fla_mesa.ops import tuning


def test_every_listed_kernel_is_an_autotuned_fla_kernel():
    assert [name for name, _ in tuning.hopper_tuners()] == list(tuning.HOPPER_SPACES)


@pytest.mark.parametrize('name', list(tuning.HOPPER_SPACES))
def test_subset_is_fla_configurations_in_the_kept_set(name):
    tuner = dict(tuning.hopper_tuners())[name]
    full, kept_set = tuner.configs, tuning.HOPPER_SPACES[name][0]
    kept = tuning.subset(full, kept_set)
    assert all(c in full for c in kept)
    offered = {tuning.config_signature(c) for c in full} & kept_set
    assert {tuning.config_signature(c) for c in kept} == (offered or {tuning.config_signature(c) for c in full})


def test_subset_of_a_foreign_list_is_the_whole_list():
    configs = [triton.Config({'BT': 16}, num_warps=4), triton.Config({'BT': 32}, num_warps=8)]
    assert tuning.subset(configs, tuning.HOPPER_SPACES['fla.ops.common.chunk_h.chunk_fwd_kernel_h'][0]) == configs


def test_narrowed_search_at_the_measured_sizes_only(monkeypatch):
    name = 'fla.ops.common.chunk_o.chunk_bwd_kernel_dqkwg'
    tuner = dict(tuning.hopper_tuners())[name]
    kept, sizes = tuning.HOPPER_SPACES[name]
    assert sizes == {128}
    monkeypatch.setattr(tuner, 'prune_configs', tuner.prune_configs)
    monkeypatch.setattr(tuner, 'nargs', {}, raising=False)
    tuning.narrow(tuner, kept, sizes)
    tuner.nargs = {'K': 128, 'V': 128}
    assert tuner.prune_configs({}) == tuning.subset(tuner.configs, kept) != tuner.configs
    for K, V in [(128, 256), (64, 64), (256, 128)]:  # fla's full space: 256 overflows the shared memory
        tuner.nargs = {'K': K}
        assert tuner.prune_configs({'V': V}) == tuner.configs


def test_narrowing_applies_once_for_the_process(monkeypatch):
    calls = []
    monkeypatch.setattr(tuning, 'narrow', lambda tuner, kept, sizes: calls.append((tuner, kept, sizes)))
    monkeypatch.setattr(tuning, '_narrowed', False)
    monkeypatch.setattr(tuning, '_enabled', lambda device: False)
    tuning.narrow_fla_autotune(None)
    assert calls == []
    monkeypatch.setattr(tuning, '_enabled', lambda device: True)
    tuning.narrow_fla_autotune(None)
    tuning.narrow_fla_autotune(None)
    assert calls == [(tuner, *tuning.HOPPER_SPACES[name]) for name, tuner in tuning.hopper_tuners()]


def test_full_autotune_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv('FLA_MESA_FULL_AUTOTUNE', '1')
    assert not tuning._enabled(torch.device('cpu'))


@pytest.mark.gpu
@pytest.mark.parametrize('name', list(tuning.HOPPER_SPACES))
def test_fla_offers_every_kept_configuration_on_a_gpu(name):
    tuner = dict(tuning.hopper_tuners())[name]
    assert tuning.HOPPER_SPACES[name][0] <= {tuning.config_signature(c) for c in tuner.configs}
