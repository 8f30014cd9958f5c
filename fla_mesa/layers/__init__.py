from fla_mesa.layers.mesa import MesaAttention

__all__ = ['MesaAttention']
