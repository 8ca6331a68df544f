"""A trial's final numbers: Best / Last / Diff from its curve and standard AutoAttack on its best
and last weights (method A.9, B §7), written to its ``summary.json``.

Works on a finished trial folder alone (the checkpoint holds the weights and the history), so
``ablate train``, a sweep's workers and ``ablate evaluate`` all end a trial the same way, and none
of them needs a Trainer to attack two state dicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


from . import files, plugins
from .attacks import autoattack_accuracy
from .config import TrialConfig
from .errors import AblateError
from .curves import best_last
from .data import Data, load_data
from .checkpoint import load_best, read
from .io import load_json, save_json
from .provenance import provenance
from .device import eval_batch_size, resolve_device
from .models import build_trial_model

AUTOATTACK_CPU_BATCH = 250  # AutoAttack's own default batch


def write_summary(config: TrialConfig, workdir: str | Path, history: list[dict[str, Any]], *,
                  autoattack: int | None = None, weights_changed: bool = True,
                  data: Data | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Write ``summary.json`` (best / last / diff) into the trial folder and return it.

    With ``autoattack`` (N test images, 0 = all) it also holds AutoAttack numbers, kept from the
    previous summary when the weights did not change since (``weights_changed=False``) and N is
    the same. ``data`` saves loading the dataset again when the caller holds it; call it after
    the trainer's ``release()``, so that AutoAttack has the GPU's memory. ``batch_size`` is
    AutoAttack's (None: as the per-epoch evaluation chooses its batch).
    """
    workdir = Path(workdir)
    summary: dict[str, Any] = {"key": config.key, **best_last(history),
                               **provenance(resolve_device(config.device))}
    path = workdir / files.SUMMARY
    if not weights_changed and path.exists():
        summary.update({k: v for k, v in load_json(path).items() if "autoattack" in k})
    if autoattack is not None:
        data = data or load_data(config.dataset, config.data_root, config.download)
        n = min(autoattack or len(data.test_y), len(data.test_y))
        if summary.get("autoattack_n") != n:
            summary.update(autoattack_trial(config, workdir, n, data, batch_size))
    save_json(summary, path)
    return summary


def autoattack_trial(config: TrialConfig, workdir: Path, n: int, data: Data,
                     batch_size: int | None = None) -> dict[str, Any]:
    """Standard AutoAttack accuracy of the trial's best and last weights on ``n`` test images,
    ``batch_size`` at a time (None: on a GPU as many as fit, as for the per-epoch evaluation;
    AUTOATTACK_CPU_BATCH on the CPU). AutoAttack draws its random restarts per batch, so its
    number depends on the batch size by a few images' worth.

    The best weights' number is kept in ``autoattack.partial.json`` until the last weights' is
    known too, so a run stopped in between does not attack the best weights again. AutoAttack's
    batches shrink as images are found non-robust, so cuDNN's benchmark mode (which the trainer
    turns on for its fixed shapes) would search kernels for every new size: it is turned off.
    """
    import torch

    device = resolve_device(config.device)
    torch.backends.cudnn.benchmark = False
    model = build_trial_model(config, data.info).to(device)
    checkpoint = read(workdir / files.CHECKPOINT, config.key)
    threat = config.threat_model
    partial_path = workdir / files.AUTOATTACK_PARTIAL
    partial = load_json(partial_path) if partial_path.exists() else {}
    out: dict[str, Any] = partial if partial.get("autoattack_n") == n else {}
    out["autoattack_n"] = n
    weights = {"best": lambda: load_best(workdir, checkpoint), "last": lambda: checkpoint["model"]}
    if batch_size is None and device.type == "cuda":
        image = data.test_x[:1].to(device).float().div(255)[0]
        batch_size = eval_batch_size(model, image, device)
    for which in ("best", "last"):
        if f"{which}_autoattack_acc" in out:
            continue
        model.load_state_dict(weights[which]())
        out[f"{which}_autoattack_acc"] = autoattack_accuracy(
            model, data.test_x.to(device), data.test_y.to(device), threat, n,
            batch_size=batch_size or AUTOATTACK_CPU_BATCH, seed=config.seed)
        save_json(out, partial_path)
    out["diff_autoattack_acc"] = out["best_autoattack_acc"] - out["last_autoattack_acc"]
    partial_path.unlink(missing_ok=True)
    return out


def evaluate_run(location, n_examples: int | None, device: str | None = None,
                 echo: Callable[[str], None] = lambda message: None,
                 batch_size: int | None = None) -> list[str]:
    """AutoAttack the best and last weights of every finished trial of a run folder (a path or a
    URI) that lacks it (or has it on another number of images). Each trial's numbers are saved
    as soon as they exist, so an interrupted evaluation resumes where it stopped. Returns the
    keys evaluated."""
    from .store import RunDir

    run = RunDir.open(location)
    loaded: dict[tuple, Data] = {}
    todo = []  # every trial's files are checked before the first attack: a damaged one is
    for key, config in run.trials().items():  # named before any work, and nothing changes
        summary = run.trial_summary(key)
        if summary is None:
            continue  # not finished: nothing final to attack yet
        unknown = plugins.missing(config)
        if unknown:
            raise AblateError(f"trial {key}: its {unknown} comes from a plugin file; pass that "
                              "file with --plugin FILE")
        source = (config.dataset, config.data_root, config.download)
        if source not in loaded:
            loaded[source] = load_data(*source)
        data = loaded[source]
        n = min(n_examples or len(data.test_y), len(data.test_y))
        if summary.get("autoattack_n") == n:
            continue
        if device:
            config = config.replace(device=device)  # where it runs is not part of the key
        run.sync(files.trial_file(key, files.CHECKPOINT))
        state = read(run.trial_dir(key) / files.CHECKPOINT, key)
        if state.get("best_epoch") is not None:  # else 0.2.0's, which holds the best weights
            run.sync(files.trial_file(key, files.best_checkpoint(state["best_epoch"])))
        load_best(run.trial_dir(key), state)  # refuses another trial's
        todo.append((key, config, summary, data, n))
    done = []
    for key, config, summary, data, n in todo:
        echo(f"{key}: AutoAttack on {n} test images, best and last weights")
        summary.update(autoattack_trial(config, run.trial_dir(key), n, data, batch_size))
        run.write_json(files.trial_file(key, files.SUMMARY), summary)
        run.rebuild_summaries()
        done.append(key)
    run.rebuild_summaries()  # also repairs a table that an earlier stop left short
    return done
