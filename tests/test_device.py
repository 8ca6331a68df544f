"""ablation/device.py: the device and precision checks, TF32 switches and the evaluation batch.

The GPU answers (device count, compute capability, free memory) are stood in for with
monkeypatch where the rule itself is what is tested; tests/test_gpu.py runs the same paths on a
real GPU.
"""

import pytest
import torch

from ablation import device as dev
from ablation.config import from_dict
from ablation.datasets import dataset_info
from ablation.errors import ConfigError
from ablation.models import build_trial_model


@pytest.fixture
def one_gpu(monkeypatch):
    """A process that sees one GPU of compute capability 7.5 (a T4), as far as the checks ask."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")


def test_a_gpu_index_beyond_the_visible_ones_is_one_line(one_gpu):
    assert dev.resolve_device("cuda") == torch.device("cuda", 0)
    assert dev.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"'cuda:1' asked for, but this process sees 1 GPU"):
        dev.resolve_device("cuda:1")


def test_cuda_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available here"):
        dev.resolve_device("cuda:0")


def test_bf16_needs_compute_capability_8(one_gpu, monkeypatch):
    with pytest.raises(ConfigError, match=r"bf16 needs .* 8\.0 or newer .*Tesla T4 is 7\.5"):
        dev.check_precision("bf16", torch.device("cuda", 0))
    dev.check_precision("fp32", torch.device("cuda", 0))  # fp32 and tf32 run anywhere
    dev.check_precision("tf32", torch.device("cuda", 0))
    dev.check_precision("bf16", torch.device("cpu"))  # the CPU's autocast has bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    dev.check_precision("bf16", torch.device("cuda", 0))


def test_tf32_switches_round_trip_through_the_api_torch_accepts():
    before = dev.tf32_enabled()
    try:
        dev.set_tf32(True)
        assert dev.tf32_enabled() == {"conv": True, "matmul": True}
        dev.set_tf32(False)
        assert dev.tf32_enabled() == {"conv": False, "matmul": False}
    finally:
        dev.set_tf32(before["conv"])


def test_tf32_is_a_precision_of_its_own_with_its_own_key():
    fp32, tf32 = (from_dict({"precision": p}) for p in ("fp32", "tf32"))
    assert fp32.key != tf32.key  # what ran is named: TF32 convolutions are another computation
    assert dev.dtype_of("tf32") == torch.float32 and dev.dtype_of("fp64") == torch.float64


@pytest.mark.parametrize("model,mib", [("preact18", 4.3), ("wrn34_10", 22.0)])
def test_eval_memory_per_image_matches_the_measured_size(model, mib):
    # The sizes the issue measured on the CPU for one eval-mode PGD step in fp32: 4.3 MiB per
    # CIFAR image for PreAct-18, 22 MiB for WRN-34-10 (saved activations of the forward).
    info = dataset_info("cifar10")
    net = build_trial_model(from_dict({"model": model}), info)
    per_image = dev.eval_bytes_per_image(net, torch.rand(3, 32, 32)) / 2**20
    assert per_image == pytest.approx(mib, rel=0.15)
    assert net.training, "the probe leaves the model's mode as it found it"


def test_the_gpu_eval_batch_fills_half_the_free_memory(monkeypatch):
    net = build_trial_model(from_dict({"model": "preact18"}), dataset_info("cifar10"))
    image = torch.rand(3, 32, 32)
    per_image = dev.eval_bytes_per_image(net, image)
    assert dev.eval_batch_size(net, image, torch.device("cpu")) == dev.CPU_EVAL_BATCH
    for free, want in ((10 * 2**30, int(0.5 * 10 * 2**30 // per_image)),  # ~1190 images
                       (2**40, dev.MAX_EVAL_BATCH), (2**20, 32)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=free: (f, 2 * f))
        assert dev.eval_batch_size(net, image, torch.device("cuda", 0)) == want
    # a pack of 4 shares the memory; on the CPU a pack evaluates at a lone trial's batch
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 2**35))
    assert dev.eval_batch_size(net, image, torch.device("cuda", 0), copies=4) == \
        int(0.5 * 10 * 2**30 // per_image) // 4
    assert dev.eval_batch_size(net, image, torch.device("cpu"), copies=4) == dev.CPU_EVAL_BATCH


def test_the_out_of_memory_line_keeps_what_was_asked_and_what_was_free():
    message = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
               "79.19 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process "
               "has 78.12 GiB memory in use. Of the allocated memory 77.50 GiB is allocated by "
               "PyTorch. If reserved but unallocated memory is large try setting "
               "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")
    assert dev.oom_line(RuntimeError(message)) == (
        "Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
        "is free")
