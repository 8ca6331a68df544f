"""Where a trial runs and in which number format: the device and its checks, the TF32 switches, and
the evaluation batch that fits the device's free memory.

Every check here is one line (ConfigError) naming the field and the fix, raised before a model is
built: a wrong device or precision would otherwise fail minutes later with a CUDA traceback,
which a sweep would retry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

CPU_EVAL_BATCH = 128  # the CPU's evaluation batch: its float rounding is what the tests pin
# A GPU's evaluation batch: the images that fit in this share of the free memory at the measured
# bytes per image (headroom for the allocator's fragmentation and cuDNN's workspaces), at most
# MAX_EVAL_BATCH (beyond which a PGD step gains nothing measurable on an H200-class GPU).
EVAL_MEMORY_SHARE = 0.5
MAX_EVAL_BATCH = 4096


def resolve_device(name: str, source: str = "key 'device'") -> torch.device:
    """The torch device a trial's ``device`` field (or the option ``source``) names: ``auto`` is
    the first GPU if there is one, else the CPU; a GPU that is not there is one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{source}: {name!r} asked for, but CUDA is not available here")
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise ConfigError(f"{source}: {name!r} asked for, but this process sees {count} "
                              f"GPU(s) (cuda:0..cuda:{count - 1}; a Ray trial sees only its own "
                              "as cuda:0); use device: cuda or auto")
        return torch.device("cuda", device.index or 0)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{source}: {name!r} asked for, but MPS is not available here")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 on a GPU without bfloat16 tensor cores (compute capability below 8.0: T4, V100, RTX
    20xx) is one line: torch would emulate it, slowly, or fail in a kernel."""
    if precision != "bf16" or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"key 'precision': bf16 needs a GPU of compute capability 8.0 or newer "
                          f"(Ampere); {name} is {major}.{minor}; use precision: fp32")


def dtype_of(precision: str) -> torch.dtype:
    """The dtype of weights, inputs and optimizer state (bf16 autocasts from float32)."""
    return torch.float64 if precision == "fp64" else torch.float32


def set_tf32(enabled: bool) -> None:
    """TF32 tensor-core math for float32 convolutions and matmuls, on or off (process-wide; a
    no-op where no GPU has TF32). torch 2.9 replaced the ``allow_tf32`` flags and refuses a mix of
    the two APIs, so the new one is used where it exists."""
    value = "tf32" if enabled else "ieee"
    backends = torch.backends
    if hasattr(backends.cudnn, "conv") and hasattr(backends.cudnn.conv, "fp32_precision"):
        backends.cudnn.conv.fp32_precision = value
        backends.cuda.matmul.fp32_precision = value
    else:  # torch before 2.9
        backends.cudnn.allow_tf32 = enabled
        backends.cuda.matmul.allow_tf32 = enabled


def tf32_enabled() -> dict[str, bool]:
    """Whether float32 convolutions and matmuls run in TF32 (read through the API set_tf32 uses)."""
    backends = torch.backends
    if hasattr(backends.cudnn, "conv") and hasattr(backends.cudnn.conv, "fp32_precision"):
        return {"conv": backends.cudnn.conv.fp32_precision == "tf32",
                "matmul": backends.cuda.matmul.fp32_precision == "tf32"}
    return {"conv": backends.cudnn.allow_tf32, "matmul": backends.cuda.matmul.allow_tf32}


def eval_bytes_per_image(model: nn.Module, image: torch.Tensor) -> int:
    """Bytes that one more image adds to an evaluation PGD step (the tensors autograd saves for
    the input gradient, which dominate its memory), from two small batches: what does not grow
    with the batch (the weights autograd keeps) cancels. ``image`` is one (C, H, W) input in the
    dtype and on the device the model runs with."""
    def saved(batch: int) -> int:
        storages: dict[int, int] = {}  # one tensor is often saved twice (a ReLU's output, the
        # next convolution's input): count each storage once

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        x = image.expand(batch, *image.shape).clone().requires_grad_(True)
        y = torch.zeros(batch, dtype=torch.long, device=image.device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        del loss
        return sum(storages.values())

    was_training = model.training
    model.eval()
    try:
        return max(1, (saved(4) - saved(2)) // 2)
    finally:
        model.train(was_training)


def eval_batch_size(model: nn.Module, image: torch.Tensor, device: torch.device,
                    copies: int = 1) -> int:
    """The evaluation batch per network when the config leaves it open: CPU_EVAL_BATCH on the
    CPU; on a GPU as many images as fit in EVAL_MEMORY_SHARE of the free memory, shared by the
    ``copies`` networks of a pack (at least 32, at most MAX_EVAL_BATCH). The trainer halves it
    if a batch still runs out of memory."""
    if device.type != "cuda":
        return CPU_EVAL_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    per_image = eval_bytes_per_image(model, image)
    return int(min(MAX_EVAL_BATCH, max(32, EVAL_MEMORY_SHARE * free // per_image // copies)))


def oom_line(err: BaseException) -> str:
    """The part of torch's out-of-memory message that says what was asked for and what was
    free ("Tried to allocate 2.00 GiB. GPU 0 has a total capacity of ... of which ... is
    free."), without its advice about allocator settings."""
    text = " ".join(str(err).split())
    sentences = [s.strip() for s in text.split(". ") if s.strip()]
    kept = [s for s in sentences if s.startswith(("Tried to allocate", "GPU "))]
    return ". ".join(kept[:2]).rstrip(".") or text[:200]
