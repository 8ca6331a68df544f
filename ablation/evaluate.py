"""AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) through ``pyautoattack`` (METHOD B §7)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attacks import ThreatModel

AA_NORMS = {"linf": "Linf", "l2": "L2"}


def autoattack_accuracy(model: nn.Module, images: Tensor, labels: Tensor, threat: ThreatModel,
                        n_examples: int | None = None, batch_size: int = 250,
                        seed: int = 0) -> float:
    """Robust accuracy under standard AutoAttack on the first ``n_examples`` test images.

    ``images`` are uint8 or [0,1] floats; the model normalises inside its forward and is put in
    eval mode here, as AutoAttack requires (B §7.1). The eps is the trial's own (L2: 128/255).
    """
    from pyautoattack import AutoAttack  # imported here: loading it costs a second at start-up

    n = len(labels) if n_examples is None else min(n_examples, len(labels))
    x = images[:n]
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    y = labels[:n]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        attack = AutoAttack(model, norm=AA_NORMS[threat.norm], eps=threat.eps,
                            version="standard", device=device, seed=seed)
        x_adv, _ = attack.run_standard_evaluation(x.to(device), y.to(device),
                                                  batch_size=batch_size)
        correct = 0
        with torch.no_grad():
            for i in range(0, n, batch_size):
                logits = model(x_adv[i:i + batch_size].to(device))
                correct += (logits.argmax(1) == y[i:i + batch_size].to(device)).sum().item()
    finally:
        model.train(was_training)
    return correct / n


def evaluate_run(location, n_examples: int | None, device: str | None = None,
                 echo=print) -> list[str]:
    """AutoAttack the best and last weights of every finished trial of a run folder (a path or a
    URI) that lacks it (or has it on another number of images). Each trial's numbers are saved
    as soon as they exist, so an interrupted evaluation resumes where it stopped. Returns the
    keys evaluated."""
    from .data import load_data
    from .io import load_json, save_json
    from .store import RunDir
    from .trainer import CHECKPOINT, SUMMARY, Trainer

    run = RunDir.open(location)
    test_sizes: dict[tuple, int] = {}
    done = []
    for key, config in run.trials().items():
        summary_path = run.trial_dir(key) / SUMMARY
        if not summary_path.exists():
            continue  # not finished: nothing final to attack yet
        summary = load_json(summary_path)
        data = (config.dataset, config.data_root, config.download)
        if data not in test_sizes:
            test_sizes[data] = len(load_data(*data).test_y)
        n = min(n_examples or test_sizes[data], test_sizes[data])
        if summary.get("autoattack_n") == n:
            continue
        if device:
            config = config.replace(device=device)  # where it runs is not part of the key
        run.sync(f"trials/{key}/{CHECKPOINT}")
        trainer = Trainer(config, run.trial_dir(key))
        echo(f"{key}: AutoAttack on {n} test images, best and last weights")
        summary.update(trainer.autoattack(n))
        save_json(summary, summary_path)
        run.push(summary_path)
        run.add_summary(config, summary)
        done.append(key)
    return done
