from fla_mesa.ops.chunk import chunk_mesa
from fla_mesa.ops.fused_recurrent import fused_recurrent_mesa
from fla_mesa.ops.naive import naive_cg_mesa, naive_recurrent_mesa
from fla_mesa.ops.utils import forget_gate_cap

__all__ = ['chunk_mesa', 'fused_recurrent_mesa', 'forget_gate_cap', 'naive_cg_mesa', 'naive_recurrent_mesa']
