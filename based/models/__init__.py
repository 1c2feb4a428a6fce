"""BASED models: config, presets, Hugging Face integration (registered with the Auto classes on import)."""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import MIXER_TYPES, BasedConfig
from .modeling import BasedBlock, BasedForCausalLM, BasedModel, BasedPreTrainedModel
from .presets import PRESETS

AutoConfig.register(BasedConfig.model_type, BasedConfig, exist_ok=True)
AutoModel.register(BasedConfig, BasedModel, exist_ok=True)
AutoModelForCausalLM.register(BasedConfig, BasedForCausalLM, exist_ok=True)

__all__ = [
    "BasedConfig", "BasedModel", "BasedForCausalLM", "BasedPreTrainedModel", "BasedBlock",
    "PRESETS", "MIXER_TYPES",
]
