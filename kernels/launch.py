"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import torch


def check_device(kernel, *tensors: torch.Tensor) -> None:
    """Triton needs GPU tensors unless ``kernel`` was defined for its interpreter
    (``TRITON_INTERPRET=1`` when its module was imported)."""
    if type(kernel).__name__ == "InterpretedFunction":
        return
    for tensor in tensors:
        if tensor is not None and tensor.device.type == "cpu":
            raise ValueError(
                "Triton kernels need GPU tensors (Triton has no CPU backend); on CPU "
                "use the CPU paths of vllm_longspec.attention, or set TRITON_INTERPRET=1 "
                "before importing triton to run the interpreter")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
