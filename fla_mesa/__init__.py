"""fla_mesa: the Mesa layer of MesaNet (arXiv 2506.05233) for flash-linear-attention.

Importing the package registers `MesaConfig` (model_type 'mesa'), `MesaModel` and `MesaForCausalLM` with
transformers' AutoConfig, AutoModel and AutoModelForCausalLM.
"""

from fla_mesa import ops
from fla_mesa.layers import MesaAttention
from fla_mesa.models import MesaConfig, MesaForCausalLM, MesaModel

__all__ = ['MesaAttention', 'MesaConfig', 'MesaForCausalLM', 'MesaModel', 'ops']
__version__ = '0.1.0'
