"""`ScaledStates.of`: the float16 storage with a power of two per column that the kernels read."""

import torch

from fla_mesa.ops.scaled_states import ScaledStates, state_parts


def test_scales_are_the_power_of_two_at_or_below_each_columns_largest():
    h = torch.tensor([[0., 3., -0.75, 1.5 * 2. ** -100], [0., -1., 0.5, 0.]])
    st = ScaledStates.of(h)
    # a zero column keeps scale 1; a column below float16's range is still stored to float16's rounding
    assert st.scales.tolist() == [1., 2., 0.5, 2. ** -100] and st.values.dtype == torch.float16
    assert torch.equal(st.float(), h)
    assert state_parts(st) == (st.values, st.scales) and state_parts(h) == (h, None)


def test_each_entry_within_float16_rounding_of_its_columns_largest():
    h = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(0)) * torch.logspace(-12, 12, 8)
    st = ScaledStates.of(h)
    col = h.abs().amax(-2, keepdim=True)
    assert ((st.float() - h).abs() / col).max() <= 2 ** -11
    assert (st.values.abs().amax(-2) >= 1).all() and (st.values.abs().amax(-2) < 2).all()
