"""FLARE on Hugging Face models: two-stream (English source + target language) LoRA / QLoRA.

    import flare
    model = flare.get_flare_model(hf_model, flare.FlareConfig(fusion="add_relu"))
    out = model(input_ids, attention_mask, source_input_ids=en_ids, source_attention_mask=en_mask, labels=labels)
    model.save_pretrained("adapter/")                   # PEFT layout + flare_config.json
    model = flare.load_flare_model(fresh_hf_model, "adapter/")

The method: ``../shared/docs/flare-method.md``. Tiny test models: ``flare.testing``.
"""

from .adapter_io import load_flare_model, save_flare_adapter
from .config import FlareConfig
from .model import FlareModel, get_flare_model

__all__ = ["FlareConfig", "FlareModel", "get_flare_model", "load_flare_model", "save_flare_adapter"]
