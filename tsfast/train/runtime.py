"""Where and in what precision training runs: device, dtype, autocast, the kernels preflight,
whether the run fits in the device's memory at all, and an NVIDIA GPU that is present but
that this PyTorch cannot use."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from tsfast import ops
from tsfast.config import ConfigError
from tsfast.files import human_bytes
from tsfast.ops import attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ValueError):
    """A device (or a dtype on it) that is not there."""


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


# The oldest NVIDIA driver each CUDA major release runs on (NVIDIA's CUDA compatibility
# guide, "minor version compatibility": 11.x >= 450, 12.x >= 525, 13.x >= 580).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
PROC_DRIVER_VERSION = Path("/proc/driver/nvidia/version")
INSTALL_HELP = 'README.md, "GPU machines: a PyTorch for your driver"'


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version ("535.183.01"), or None when there is none:
    /proc/driver/nvidia/version, else `nvidia-smi`."""
    try:
        text = PROC_DRIVER_VERSION.read_text(errors="replace")
        found = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.match(r"\s*(\d+(?:\.\d+)+)", out.stdout) if out.returncode == 0 else None
    return found.group(1) if found else None


def unusable_gpu() -> str | None:
    """Why an NVIDIA GPU that is here cannot be used by this PyTorch, with the fix; None when
    CUDA works, no NVIDIA driver is loaded, or CUDA_VISIBLE_DEVICES hides the GPUs on purpose."""
    if torch.cuda.is_available():
        return None
    driver = nvidia_driver_version()
    if driver is None or os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return None
    build = torch.version.cuda
    here = f"an NVIDIA GPU is here (driver {driver}) but PyTorch {torch.__version__} cannot use it"
    if build is None:
        return f"{here}: it is a CPU-only build. Fix: install a CUDA build of PyTorch ({INSTALL_HELP})"
    need = MIN_DRIVER.get(int(build.split(".")[0]))
    if need is not None and int(driver.split(".")[0]) < need:
        fits = max((m for m, d in MIN_DRIVER.items() if d <= int(driver.split(".")[0])), default=None)
        fix = (f"install PyTorch built for CUDA {fits}.x, which runs on this driver ({INSTALL_HELP}), or "
               if fits is not None and fits >= 12 else "")
        return (f"{here}: it is built for CUDA {build}, which needs NVIDIA driver {need} or newer. "
                f"Fix: {fix}upgrade the NVIDIA driver to {need} or newer")
    return (f"{here} (it is built for CUDA {build}; torch.cuda.is_available() is False). "
            f"Check that `nvidia-smi` lists the GPU and what CUDA_VISIBLE_DEVICES says")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA, then MPS, then CPU. An explicit device that is missing is a DeviceError
    (naming the fix when an NVIDIA GPU is here but unusable: see `auto_device_warning`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            why = unusable_gpu()
            raise DeviceError(
                f"--device cuda: {why}; or use --device cpu" if why else
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


def auto_device_warning(name: str, device: torch.device) -> str | None:
    """With --device auto, a warning when the run falls back from an NVIDIA GPU that is here
    but unusable (otherwise a GPU machine would train on its CPU without a word)."""
    if name != "auto" or device.type == "cuda":
        return None
    why = unusable_gpu()
    return f"warning: {why}. Training on the {device.type} instead (--device auto)" if why else None


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


def preflight_kernels(backend: str, device: torch.device, head_dim: int) -> None:
    """With backend "triton", raise ops.BackendUnavailable now (before any training work) if
    the Triton kernels cannot run on `device` or the attention kernel declines the model's
    head dim. It asks the ops themselves, on meta tensors of the model's shape."""
    if backend != "triton":
        return
    cannot = ops.triton_cannot_run(device)
    if cannot:
        raise ops.BackendUnavailable(f"--kernels triton cannot run here: {cannot}")
    q = torch.empty(1, 1, 1, head_dim, device="meta")
    declined = attention.kernel_declines(q, q, dropout_p=0.0)
    if declined:
        raise ops.BackendUnavailable(f"--kernels triton cannot run rope_attention for this model: {declined}")


def memory_estimate(cfg, vocab_size: int = 50257) -> tuple[int, int, int]:
    """(bytes in all, bytes for weights + gradients + AdamW state, bytes of activations): a
    rough lower bound for one training process. 16 bytes a parameter (fp32 weights,
    gradients, two moments); 34 bytes per token, layer and unit of width for what the
    backward pass keeps (Korthikanti et al. 2022, with fused attention: no T x T scores)."""
    from tsfast.model import GPT

    c, layers, t = cfg.n_embd, cfg.n_layer, cfg.block_size
    with torch.device("meta"):  # the model counts its own parameters; nothing is allocated
        params = GPT(cfg.model_config(vocab_size)).num_params()
    state = 16 * params
    activations = 34 * cfg.batch_size * t * c * layers + 16 * cfg.batch_size * (t + 1)
    return state + activations, state, activations


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory `device` has in all (for the CPU: RAM, or the cgroup's limit if lower)."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "mps":
            return int(torch.mps.recommended_max_memory())
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def check_memory(cfg, device: torch.device) -> None:
    """Refuse, with the numbers, a run whose memory estimate exceeds what the device has."""
    total = device_memory(device)
    needed, state, activations = memory_estimate(cfg)
    if device.type == "cpu":  # the processes of a node share its RAM
        needed *= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if total is None or needed <= total:
        return
    raise ConfigError(
        f"this run needs at least {human_bytes(needed)} of memory ({human_bytes(state)} for the weights, "
        f"gradients and AdamW state, {human_bytes(activations)} for the activations of batch_size "
        f"{cfg.batch_size} x block_size {cfg.block_size}), but the {device.type} has {human_bytes(total)}; "
        "lower batch_size (raise grad_accum to keep the tokens per step), block_size, n_embd or n_layer"
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
