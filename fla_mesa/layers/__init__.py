from fla_mesa.layers.attn import Attention
from fla_mesa.layers.mesa import MesaAttention

__all__ = ['Attention', 'MesaAttention']
