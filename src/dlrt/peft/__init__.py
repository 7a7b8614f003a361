"""GeoLoRA: rank-adaptive low-rank adapters for fine-tuning, with PEFT's API.

::

    from dlrt.peft import GeoLoRAConfig, get_geolora_model
    config = GeoLoRAConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_geolora_model(model, config)
    model.print_trainable_parameters()
    opt = model.make_optimizer()                 # a DLRTOptimizer (parallel integrator, geo-adam, lr 5e-3)
    ...                                          # loss.backward(); opt.step(); opt.zero_grad()
    model.save_pretrained("adapter/")
    merged = model.merge_and_unload()

``GeoLoRACallback`` (needs ``transformers``) plugs the optimizer into ``transformers.Trainer``.
"""

from typing import Any

from ..layers import LowRankAdapter
from .config import GeoLoRAConfig
from .model import GeoLoRAModel, get_geolora_model

__all__ = ["GeoLoRACallback", "GeoLoRAConfig", "GeoLoRAModel", "LowRankAdapter", "get_geolora_model"]


def __getattr__(name: str) -> Any:
    if name == "GeoLoRACallback":  # imports transformers: only on demand
        from .trainer import GeoLoRACallback

        return GeoLoRACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
