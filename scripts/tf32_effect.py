"""How much TF32 convolutions change a trial's curve, measured on the CPU by emulating TF32.

TF32 (Ampere and newer GPUs) multiplies with a 10-bit mantissa and sums in float32. This script
emulates that on the CPU: every convolution and linear layer rounds its inputs, weights and
incoming gradients to 10 mantissa bits (round to nearest even), in the forward pass and in both
backward products, as cuDNN's TF32 kernels do. It trains sweeps/trials/digits_tiny.yaml (the CPU
demo trial; 8 epochs) in fp32, in emulated TF32 and in fp64, and with another seed, and prints
how far apart the curves are: the TF32 effect next to the float32 rounding effect (fp32 vs fp64)
and next to seed noise. docs/method.md C.6 records the result; the GPU check measures the real
thing on a GPU (`precision: fp32` vs `tf32`).

    python scripts/tf32_effect.py            # about 4 minutes on one core
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["train_robust_acc", "test_acc", "test_robust_acc"]


def tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) rounded to TF32's 10-bit mantissa, to nearest even."""
    bits = t.contiguous().view(torch.int32)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32).view_as(t)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w)
        ctx.args = stride, padding, dilation, groups
        return _conv2d(tf32(x), tf32(w), None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        g = tf32(g)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(x.shape, tf32(w), g, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            gw = torch.nn.grad.conv2d_weight(tf32(x), w.shape, g, stride, padding, dilation,
                                             groups)
        return gx, gw, None, None, None, None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _linear(tf32(x), tf32(w))

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = tf32(g)
        gx = g @ tf32(w) if ctx.needs_input_grad[0] else None
        gw = g.t() @ tf32(x) if ctx.needs_input_grad[1] else None
        return gx, gw


_conv2d, _linear = F.conv2d, F.linear


def _tf32_conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1):
    pair = torch.nn.modules.utils._pair
    out = _Conv.apply(x, w, pair(stride), pair(padding), pair(dilation), groups)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _tf32_linear(x, w, bias=None):
    out = _Linear.apply(x, w)
    return out if bias is None else out + bias


def curve(emulate_tf32: bool = False, **changes) -> pd.DataFrame:
    from ablation.config import load_trial
    from ablation.trainer import Trainer

    config = load_trial(ROOT / "sweeps/trials/digits_tiny.yaml").replace(**changes)
    if emulate_tf32:
        F.conv2d, F.linear = _tf32_conv2d, _tf32_linear
    try:
        with tempfile.TemporaryDirectory() as folder:
            return pd.DataFrame(Trainer(config, folder).fit())[METRICS]
    finally:
        F.conv2d, F.linear = _conv2d, _linear


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(1000)
    assert torch.equal(tf32(tf32(x)), tf32(x)) and (tf32(x) - x).abs().max() <= x.abs().max() / 2**11
    runs = {"fp32": curve(), "tf32 (emulated)": curve(emulate_tf32=True),
            "fp64": curve(precision="fp64"), "fp32, seed 1": curve(seed=1)}
    reference = runs["fp32"]
    print("max |difference| from the fp32 curve over 8 epochs, in accuracy points (%):")
    print(f"{'run':<18}" + "".join(f"{m:>18}" for m in METRICS))
    for name, frame in runs.items():
        if name != "fp32":
            gaps = ((frame - reference).abs().max() * 100).tolist()
            print(f"{name:<18}" + "".join(f"{g:>18.2f}" for g in gaps))
    print("final test_robust_acc: " + ", ".join(
        f"{name} {frame.test_robust_acc.iloc[-1]:.2%}" for name, frame in runs.items()))


if __name__ == "__main__":
    sys.exit(main())
