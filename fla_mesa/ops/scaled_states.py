"""Chunk states in float16 with a power of two per column: the state kernel's storage for half-precision inputs at
K <= 64 (`chunk.scaled_states`), read by the CG kernel and the backward's gradient kernels."""

from typing import NamedTuple

import torch


class ScaledStates(NamedTuple):
    """Chunk-start states as `values` `[B, NT, H, K, V]` float16 times `scales` `[B, NT, H, V]` float32 (a power of two
    per column): state[..., i, j] = values[..., i, j] * scales[..., j]."""
    values: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def of(cls, h: torch.Tensor) -> 'ScaledStates':
        """float32 states `[..., K, V]` stored so: each column divided by the power of two at or below its largest
        magnitude (1 for a zero column), then rounded to float16."""
        m = h.abs().amax(-2)
        sc = torch.where(m > 0, torch.exp2(torch.floor(torch.log2(m.clamp_min(torch.finfo(m.dtype).tiny)))), 1.)
        return cls((h / sc[..., None, :]).half(), sc)

    def float(self) -> torch.Tensor:
        return self.values.float() * self.scales[..., None, :]


def state_parts(h: torch.Tensor | ScaledStates | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the tensor a kernel reads as the states, the column scales or None): float32 states come as they are."""
    return (h.values, h.scales) if isinstance(h, ScaledStates) else (h, None)
