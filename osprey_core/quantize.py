"""8-bit and 4-bit (NF4) weights for the LLM's linear layers, through bitsandbytes, for small GPUs.

What is quantized: the q/k/v/o and gate/up/down projections of every decoder layer (~6.5 B of the 7 B
parameters). What is not: the embeddings and `lm_head` (label scores are read from it), the vision
tower and projector (model dtype), and the mask extractor, which stays in fp32 as the original computes
it. bitsandbytes' NF4 has no tensor-core path (weights are dequantized before each matmul), so this
buys memory, not speed: docs/gpu.md.

Only on CUDA: on a CPU this raises QuantizationError rather than running slow, unvalidated kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .modeling import OspreyForCausalLM

QUANTIZATIONS = ("8bit", "4bit")
# LLM.int8() outlier threshold: activation columns above it are computed in fp16 (the usual default).
INT8_THRESHOLD = 6.0


class QuantizationError(ConfigError):
    """An unknown quantization mode, a CPU device, or bitsandbytes missing."""


def check_quantization(quantization: str | None, device: str | torch.device) -> str | None:
    """Validate before any weight is loaded, so a bad option fails in a second, not after 14 GB."""
    if quantization in (None, "", "none"):
        return None
    if quantization not in QUANTIZATIONS:
        raise QuantizationError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)} or none")
    if torch.device(device).type != "cuda":
        raise QuantizationError(
            f"{quantization} loading needs a CUDA GPU (bitsandbytes kernels); device is {torch.device(device)}. "
            "On a CPU load the model in float32 without quantization."
        )
    _bnb()
    return quantization


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizationError(
            "8-bit/4-bit loading needs bitsandbytes: pip install 'osprey-labeling[gpu]'"
        ) from e
    return bitsandbytes


def quantizable_linears(model: OspreyForCausalLM) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every linear layer of the LLaMA decoder layers, nothing else."""
    found = []
    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    found.append((parent, name, child))
    return found


def replace_linears(model: OspreyForCausalLM, quantization: str, compute_dtype: torch.dtype) -> int:
    """Swap the decoder linears for bitsandbytes modules holding the same weights on the CPU.

    The weights are quantized when the model moves to a CUDA device (bitsandbytes quantizes on
    `.to("cuda")`), so a checkpoint never needs its bf16 size in GPU memory. Returns how many were swapped.
    """
    bnb = _bnb()
    targets = quantizable_linears(model)
    for parent, name, lin in targets:
        weight = lin.weight.detach().to("cpu")
        bias = lin.bias
        if quantization == "4bit":
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias is not None,
                                    compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                    device="meta")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4", module=new)
        else:
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias is not None,
                                      has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().to("cpu", compute_dtype), requires_grad=False)
        new.requires_grad_(False)
        setattr(parent, name, new)
        del lin
    return len(targets)


def quantize_model(model: OspreyForCausalLM, quantization: str, device: str | torch.device) -> OspreyForCausalLM:
    """Quantize the decoder linears of a model already in its compute dtype and put it on `device`."""
    check_quantization(quantization, device)
    compute_dtype = model.lm_head.weight.dtype
    if compute_dtype == torch.float32:
        raise QuantizationError("quantize a bfloat16 or float16 model (the bitsandbytes compute dtype), not float32")
    replace_linears(model, quantization, compute_dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the bf16 copies of the replaced layers are gone
    model.to(device)
    model.mask_extractor.float()
    return model.eval()


def quantization_of(model: OspreyForCausalLM) -> str | None:
    """'8bit', '4bit' or None, read from the modules (for model versions and reports)."""
    layers = model.model.layers
    if not len(layers):
        return None
    kinds = {type(m).__name__ for m in layers[0].modules()}
    if "Linear4bit" in kinds:
        return "4bit"
    if "Linear8bitLt" in kinds:
        return "8bit"
    return None
