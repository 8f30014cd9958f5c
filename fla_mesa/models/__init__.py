from fla_mesa.models.mesa import MesaBlock, MesaConfig, MesaForCausalLM, MesaModel, MesaPreTrainedModel

__all__ = ['MesaBlock', 'MesaConfig', 'MesaForCausalLM', 'MesaModel', 'MesaPreTrainedModel']
