"""Osprey model, top to bottom: ConvNeXt CLIP trunk, projector, mask extractor, LLaMA decoder."""

from .mask_extractor import MaskExtractor
from .modeling_osprey import OspreyForCausalLM
from .vision import CLIPConvNeXtTower

__all__ = ["CLIPConvNeXtTower", "MaskExtractor", "OspreyForCausalLM"]
