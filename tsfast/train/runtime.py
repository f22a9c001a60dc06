"""Where and in what precision training runs: device, dtype, autocast, the kernels preflight."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from tsfast import ops
from tsfast.ops import attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ValueError):
    """A device (or a dtype on it) that is not there."""


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA, then MPS, then CPU. An explicit device that is missing is a DeviceError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                "use --device cpu (or auto)"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DeviceError(
                f"process with LOCAL_RANK={local_rank} needs GPU {local_rank}, but only {count} "
                f"are visible; start at most {count} processes per node (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", local_rank)
    if name == "mps":
        if not _mps_available():
            raise DeviceError("--device mps: Apple MPS is not available here; use --device cpu (or auto)")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {name!r}: choose one of auto, cuda, mps, cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype. auto: bf16 on GPUs that support it, else fp16; fp32 on CPU and MPS."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise DeviceError("--dtype float16 is not supported on the CPU; use --dtype float32 (or auto)")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{torch.cuda.get_device_name(device)} has no bfloat16; use --dtype float16 (or auto)")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision around forward passes; nothing in fp32. Master weights stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def preflight_kernels(backend: str, device: torch.device, head_dim: int, *, doc_mask: bool = False) -> None:
    """With backend "triton", raise ops.BackendUnavailable now (before any training work) if
    the Triton kernels cannot run on `device` or the attention kernel declines the model's
    head dim (or doc_ids, with doc_mask). It asks the ops themselves, on meta tensors of the
    model's shape."""
    if backend != "triton":
        return
    cannot = ops.triton_cannot_run(device)
    if cannot:
        raise ops.BackendUnavailable(f"--kernels triton cannot run here: {cannot}")
    q = torch.empty(1, 1, 1, head_dim, device="meta")
    declined = attention.kernel_declines(q, q, dropout_p=0.0, doc_ids=None)
    if declined:
        raise ops.BackendUnavailable(f"--kernels triton cannot run rope_attention for this model: {declined}")
    if doc_mask:
        doc_ids = torch.empty(1, 1, dtype=torch.int32, device="meta")
        declined = attention.kernel_declines(q, q, dropout_p=0.0, doc_ids=doc_ids)
        if declined:
            raise ops.BackendUnavailable(
                f"--kernels triton cannot run rope_attention with --doc_mask true: {declined}. "
                "Use --kernels auto (attention then runs on torch) or --doc_mask false"
            )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fast_math(device: torch.device) -> None:
    """TF32 matmuls on Ampere and newer (fp32 parts of mixed-precision training)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
