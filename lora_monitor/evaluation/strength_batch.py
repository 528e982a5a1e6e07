"""Several LoRA scales in one batch: each sample's LoRA output multiplied by its own scale.

A merged LoRA (how the evaluator generates at one scale) has one weight for the whole batch. To generate the
images of several `[eval] strengths` in the same batched calls, the adapter stays unmerged with its scale at
1.0, and a hook on each layer's `lora_B` multiplies the LoRA branch of sample j by scale j. For a LoRA layer
out = W x + s * B(A x), so the hook gives exactly each sample's own s. Under classifier-free guidance the
pipeline runs the batch twice over (unconditional, then conditional halves), so the scales are repeated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def _scaled(scales: torch.Tensor) -> Any:
    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        n = output.shape[0]
        if n % len(scales):
            raise RuntimeError(f"a LoRA layer saw a batch of {n} for {len(scales)} scales")
        vec = scales.repeat(n // len(scales)).to(device=output.device, dtype=output.dtype)
        return output * vec.view(-1, *([1] * (output.dim() - 1)))

    return hook


@contextlib.contextmanager
def per_sample_scales(layers: list[Any], adapter: str, scales: list[float]) -> Iterator[None]:
    """While inside: sample j of every batch gets `adapter` at `scales[j]` in each of `layers` (peft LoRA layers)."""
    vec = torch.tensor(scales, dtype=torch.float32)
    saved = [(layer, layer.scaling[adapter]) for layer in layers]
    handles = []
    try:
        for layer in layers:
            layer.set_scale(adapter, 1.0)  # alpha / r: the file's own scale; the hook adds each sample's
            handles.append(layer.lora_B[adapter].register_forward_hook(_scaled(vec)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, scaling in saved:
            layer.scaling[adapter] = scaling
