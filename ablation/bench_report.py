"""The tables ``ablate bench`` prints, from the JSON-ready result of
:func:`ablation.bench.run_bench` (or a file ``ablate bench --json`` wrote): one row per
intervention, the per-epoch split and the trials per GPU. Formatting only; the measurements are
``bench.py``'s."""

from __future__ import annotations

import math
import statistics
from typing import Any

from .bench import SPLIT_PARTS, peak_flops


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:{spec}}{suffix}"


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def format_report(result: dict[str, Any]) -> list[str]:
    """The stdout tables: one row per intervention, then the split and the trials per GPU."""
    env, opts = result["environment"], result["options"]
    cuda = env["device"].startswith("cuda")
    lines = [
        f"ablate bench: {opts['model']}, batch {opts['batch_size']}, PGD-{opts['train_steps']}, "
        f"random images of CIFAR-10's shape",
        f"device {env['device_name']} ({env['device']}), torch {env['torch']}, precision "
        f"{opts['precision']} (reference float32 in the same math mode), "
        f"{'compiled' if opts.get('compile') else 'eager'} (reference eager), "
        f"{env['threads']} thread(s)",
        f"timing: {opts['repeats']} interleaved repeats x {opts['batches']} batches per loop "
        f"after {opts['warmup']} warm-up batches; img/s from the median batch time; ratio = "
        f"project img/s / reference img/s",
        ""]
    head = f"{'intervention':<12} {'project img/s':>13} {'reference img/s':>15} " \
           f"{'ratio (median)':>14} {'ratio (min)':>11} {'GFLOP/img':>9}"
    kinds = [opts["precision"]]
    if cuda:
        head += "".join(f" {'MFU ' + k:>9}" for k in kinds) + f" {'peak mem':>10}"
    lines.append(head)
    for row in result["interventions"]:
        line = (f"{row['intervention']:<12} {row['project']['images_per_s']:>13.1f} "
                f"{row['reference']['images_per_s']:>15.1f} {row['ratio_median']:>13.2f}x "
                f"{row['ratio_min']:>10.2f}x "
                f"{row['flops_per_step'] / opts['batch_size'] / 1e9:>9.3g}")
        if cuda:
            line += "".join(f" {_fmt(row.get(f'mfu_{k}'), '.1%'):>9}" for k in kinds)
            line += f" {_gib(row['peak_memory_bytes']):>10}"
        lines.append(line)
    ref = result["reference"]
    lines.append(f"reference: {ref['flops_per_step'] / opts['batch_size'] / 1e9:.3g} GFLOP/img"
                 + (f", peak mem {_gib(ref['peak_memory_bytes'])}" if cuda else ""))
    if cuda:
        used = {k: peak_flops(env["device_name"], k) for k in kinds}
        lines.append("MFU peaks (dense, datasheet): " + ", ".join(
            f"{k} {_fmt(v and v / 1e12, '.1f', ' TFLOP/s')}" for k, v in used.items()))
    split = result.get("split")
    if split:
        lines += ["", f"per-epoch split ({split['intervention']}, median of "
                      f"{split['epochs_measured']} epoch(s)): {split['train_images']} train "
                      f"images, PGD-{opts['train_steps']} on {split['train_eval_images']} "
                      f"train-eval and PGD-{split['test_steps']} on {split['test_images']} test "
                      f"images; CIFAR-10 column scaled linearly to 50k/10k/10k",
                  f"{'part':<16} {'seconds':>9} {'share':>7} {'img/s':>9} {'CIFAR-10 epoch s':>16}"]
        for part in SPLIT_PARTS:
            seconds = split["seconds"][part]
            rate = split["images_per_s"].get(part)
            name = "  logging fwd" if part == "logging_forward" else part
            lines.append(f"{name:<16} {seconds:>9.3f} {split['share_of_epoch'][part]:>7.1%} "
                         f"{_fmt(rate, '.1f'):>9} {split['cifar10_epoch_seconds'][part]:>16.1f}")
        lines.append(f"{'epoch':<16} {split['epoch_seconds']:>9.3f}   (logging fwd is part of "
                     f"train)")
    packs = result.get("packs")
    if packs:
        lines += ["", "packs: K trials as one batched step (interventions in turn); ratios = pack "
                      "img/s over K separate project steps, and over K reference steps",
                  f"{'K':>3} {'img/s in all':>12} {'img/s per trial':>15} {'vs separate':>11} "
                  f"{'vs reference':>12} {'peak mem':>10}"]
        for row in packs:
            if "error" in row:
                lines.append(f"{row['k']:>3} failed: {row['error']}")
                continue
            lines.append(f"{row['k']:>3} {row['images_per_s']:>12.1f} "
                         f"{row['images_per_s_per_trial']:>15.1f} "
                         f"{_fmt(row['ratio_vs_separate'], '.2f', 'x'):>11} "
                         f"{row['ratio_vs_reference']:>11.2f}x "
                         f"{_gib(row['peak_memory_bytes']):>10}")
    splits = result.get("pack_splits")
    if splits:
        lines += ["", "per-epoch split of packs (the whole pack's seconds; the last column is a "
                      "CIFAR-10 epoch, scaled linearly, per trial of the pack)",
                  f"{'K':>3} {'train s':>9} {'eval s':>9} {'ckpt s':>9} {'epoch s':>9} "
                  f"{'CIFAR-10 epoch s/trial':>22}"]
        for split in splits:
            per_trial = sum(split["cifar10_epoch_seconds"][p] for p in
                            ("train", "evaluation", "checkpoint")) / split["k"]
            parts = split["seconds"]
            lines.append(f"{split['k']:>3} {parts['train']:>9.3f} {parts['evaluation']:>9.3f} "
                         f"{parts['checkpoint']:>9.3f} {split['epoch_seconds']:>9.3f} "
                         f"{per_trial:>22.1f}")
    trials = result.get("trials_per_gpu")
    if trials:
        lines += ["", f"trials per GPU ({result['interventions'][0]['intervention']}, "
                      f"{opts['batches'] * opts['repeats']} batches each)",
                  f"{'trials':>6} {'img/s total':>11} {'img/s per trial':>15} {'scaling':>8} "
                  f"{'peak mem':>10}"]
        for row in trials:
            if "error" in row:
                lines.append(f"{row['trials']:>6} failed: {row['error']}")
                continue
            per = statistics.median(row["per_trial_images_per_s"])
            lines.append(f"{row['trials']:>6} {row['images_per_s']:>11.1f} {per:>15.1f} "
                         f"{_fmt(row.get('scaling_vs_one'), '.2f', 'x'):>8} "
                         f"{_gib(row['peak_memory_bytes']):>10}")
    lines += [""] + [f"note: {n}" for n in result["notes"]]
    return lines
