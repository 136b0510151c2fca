"""LoRA on GPTQ layers (QLoRA with GPTQ's codes): the wrappers of QuantLinear and QuantExperts, registered with
nn.lora's tables, so apply_lora adapts a quantized model as it adapts a full-precision one. Importing
orionlm.quant registers them (quant/__init__.py imports this module)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import OrionError
from ..nn.lora import EXPERT_WRAPPERS, LINEAR_WRAPPERS, ExpertLowRank, LoRAConfig, LowRank
from ..nn.moe import STACKS
from .linear import QuantExperts, QuantLinear


def _float_like(layer: QuantLinear) -> torch.Tensor:
    """What a quantized layer's adapter is created like: float32 on its device (its own tensors are integer codes
    and float16 scales)."""
    return layer.qweight.new_empty(0, dtype=torch.float32)


def _cannot_merge(module: nn.Module) -> OrionError:
    return OrionError(
        f"cannot merge a LoRA adapter into the GPTQ {type(module).__name__.removeprefix('LoRA')} layers of a quantized "
        "model (that would need quantizing again): merge it into the full-precision model that was quantized "
        "(orionlm merge-lora --base FP_MODEL --adapter DIR), or run it unmerged (load the adapter directory)"
    )


class LoRAQuantLinear(LowRank, QuantLinear):
    """A GPTQ layer (its weight is integer codes, frozen by nature) adapted by a trainable low-rank product in
    floating point: QLoRA's recipe with GPTQ's codes. The codes keep their names, so the model's state dict only
    gains the factors, as with LoRALinear."""

    def __init__(self, base: QuantLinear, config: LoRAConfig) -> None:
        super().__init__(base.in_features, base.out_features, base.bits, base.group_size, base.bias is not None,
                         base.checkpoint_format, base.keep_dequantized, device="meta")  # fmt: skip
        for name, tensor in base.named_buffers(recurse=False):
            setattr(self, name, tensor)  # the same codes, not copies
        self._add_adapter(config, _float_like(base))

    def merged(self) -> QuantLinear:
        raise _cannot_merge(self)


class LoRAQuantExperts(ExpertLowRank, QuantExperts):
    """GPTQ experts (one QuantLinear per expert and stack) adapted as LoRAExperts adapts a stack, in the same
    PEFT layout: an adapter trained on the quantized experts loads on the full-precision ones and back."""

    def __init__(self, base: QuantExperts, config: LoRAConfig, names: list[str]) -> None:
        super().__init__(list(base.gate_up_proj), list(base.down_proj))  # the same layers, not copies
        self.num_experts = len(base.down_proj)
        shapes = {name: (getattr(self, name)[0].out_features, getattr(self, name)[0].in_features) for name in STACKS}
        self._add_adapters(config, names, shapes, _float_like(base.down_proj[0]))

    def merged(self) -> QuantExperts:
        raise _cannot_merge(self)


LINEAR_WRAPPERS[QuantLinear] = LoRAQuantLinear
EXPERT_WRAPPERS[QuantExperts] = LoRAQuantExperts
