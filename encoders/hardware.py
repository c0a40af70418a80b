"""Where the models run and in what number format: the device and the precision, each resolved in one place.

`precision` is "auto", "fp32" or "bf16" wherever a command runs a model (build, train, query, eval, serve).
"auto" resolves to bf16 where the hardware computes in it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16,
AMX-BF16 or Arm's BF16 instructions, as `torch.cpu.get_capabilities` reports them) and to fp32 elsewhere: a CPU
without them emulates bf16, which is slower than fp32. bf16 runs the models under `torch.autocast`: matrix
products in bf16, the weights and what autocast keeps in fp32 (norms, softmax) as they are.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # imported where used: the configs that name a precision load without torch
    import torch

Precision = Literal["auto", "fp32", "bf16"]
Resolved = Literal["fp32", "bf16"]

PRECISION_HELP = (
    "auto: bf16 on a CUDA GPU and on a CPU with native bf16 instructions (AVX512-BF16, AMX, Arm BF16), else "
    "fp32; bf16: always (a CPU without them emulates it, slower than fp32); fp32: never"
)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto": the GPU when torch sees one, else the CPU; asking for cuda without a GPU is an error."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was asked for but torch sees no GPU")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (not by emulation)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    capabilities = torch.cpu.get_capabilities()
    return any(bool(capabilities.get(flag)) for flag in ("avx512_bf16", "amx_bf16", "bf16"))


def resolve_precision(precision: Precision, device: torch.device) -> Resolved:
    """ "auto" -> "bf16" where `device` has native bf16, else "fp32"; "fp32" and "bf16" as given."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: Resolved) -> contextlib.AbstractContextManager[None]:
    """The context that runs a model on `device` in `precision` (bf16: torch.autocast; fp32: nothing)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def attention_kernel(device: torch.device, precision: Resolved, training: bool) -> str:
    """The attention implementation (transformers' `attn_implementation`) that runs fastest here: sdpa, except
    eager for bf16 training on a CPU, where sdpa's fused backward in bf16, and its fp32 fallback when attention
    dropout is on, are slower than eager's bf16 matrix products (bench/bench_precision.py measures it)."""
    return "eager" if training and precision == "bf16" and device.type == "cpu" else "sdpa"
