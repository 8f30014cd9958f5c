from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from fla_mesa.models.mesa.configuration_mesa import MesaConfig
from fla_mesa.models.mesa.modeling_mesa import MesaBlock, MesaForCausalLM, MesaModel, MesaPreTrainedModel

AutoConfig.register(MesaConfig.model_type, MesaConfig, exist_ok=True)
AutoModel.register(MesaConfig, MesaModel, exist_ok=True)
AutoModelForCausalLM.register(MesaConfig, MesaForCausalLM, exist_ok=True)

__all__ = ['MesaBlock', 'MesaConfig', 'MesaForCausalLM', 'MesaModel', 'MesaPreTrainedModel']
