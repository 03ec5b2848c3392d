"""dcae: Deep Compression Autoencoder (Chen et al., arXiv 2410.10733), end to end."""
from dcae.autoencoder import DCAE, DCAEConfig, DecoderConfig, EncoderConfig
from dcae.presets import create_model, get_config, list_presets

__all__ = ["DCAE", "DCAEConfig", "EncoderConfig", "DecoderConfig", "create_model", "get_config", "list_presets"]
__version__ = "0.1.0"
