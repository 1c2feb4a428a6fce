"""based: BASED linear-attention language models (Arora et al., 2024)."""
__version__ = "0.1.0"

from .models import PRESETS, BasedConfig, BasedForCausalLM, BasedModel

__all__ = ["BasedConfig", "BasedForCausalLM", "BasedModel", "PRESETS", "__version__"]
