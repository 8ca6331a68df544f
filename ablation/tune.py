"""Ray Tune as the dispatcher: one Tune trial per pack of ablate trials (a pack of one by
default, ``--pack``); the trainer stays Ray-free.

This module is the glue alone: the trainable over :func:`ablation.worker.run_unit`, the searcher
over :class:`ablation.fork.ForkQueue`, the driver's callback over :func:`ablation.worker.receive`,
and the status line of what pending trials wait for. Joining Ray is :mod:`ablation.cluster`.

Resuming does not depend on Tune's experiment restore (which, measured on Ray 2.60, can restart
trials from epoch 0 or lose trials added to the grid): every ``ablate run`` starts a Tune experiment
over the trials that are not done, and each trial resumes from the checkpoint in its own folder
``trials/<key>/``. The driver's curve store dedupes on (trial, epoch), so an epoch that is reported
again after a crash is stored once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import files
from .cluster import fits_a_node, fmt_resources, wait_for_capacity, waits_for_autoscaler
from .config import TrialConfig
from .errors import AblateError, RunFailed
from .fork import FINISHED, Fork, ForkQueue, fork_waits
from .loggers import Loggers
from .store import RunDir, dispatch_units, trial_params
from .worker import failure, receive, run_unit

WAIT_CHECK_S = 5.0  # how often the driver looks at what pending trials wait for (state.json)


def ablate_trial(sample: dict[str, Any]) -> None:
    """The Tune trainable (its name must stay stable): train or resume one pack of trials, each
    in its folder, ``sample["unit"]`` being the pack (:func:`ablation.store.dispatch_units`).

    A failure that a retry cannot fix (RunFailed: a diverged loss, a training step out of GPU
    memory; AblateError: a foreign checkpoint, missing data, a device Ray did not give) is
    reported to the driver as one line per trial, ``{"failed": ...}``, and the trainable
    returns: Tune would retry an exception ``--max-failures`` times, failing the same way each
    time. Any other exception (a lost worker, a bug) is left to Tune's retries."""
    import ray
    from ray import tune

    unit = sample["unit"]
    try:
        run_unit(unit, tune.report, ray.get_gpu_ids())
    except (RunFailed, AblateError) as err:
        for params in unit["trials"]:
            tune.report(failure(params["key"], err))


class SweepProgress:
    """A live bar over every epoch of the sweep, with trial counts by state."""

    def __init__(self, total_epochs: int, stored: set[tuple[str, int]], quiet: bool,
                 done: int = 0):
        from tqdm import tqdm

        self.done = done  # trials finished before this run, which it does not dispatch
        self.seen = set(stored)  # (key, epoch) already in the store: a replay adds nothing
        self.bar = tqdm(total=total_epochs, initial=len(self.seen), unit="epoch", disable=quiet,
                        dynamic_ncols=True, mininterval=0.5)

    def epoch(self, key: str, row: dict[str, Any]) -> None:
        if (key, row["epoch"]) not in self.seen:
            self.seen.add((key, row["epoch"]))
            self.bar.update(1)

    def update_states(self, states: dict[str, str]) -> None:
        counts = {s: sum(v == s for v in states.values()) for s in ("running", "done", "errored")}
        counts["done"] += self.done
        self.bar.set_postfix_str(", ".join(f"{n} {s}" for s, n in counts.items()))

    def close(self) -> None:
        self.bar.close()


def _key(trial) -> str:
    """The Tune trial's name: its pack's (the pack's first trial's key)."""
    return trial.config["unit"]["key"]


def _members(trial) -> list[str]:
    """The ablate trials a Tune trial trains."""
    return [params["key"] for params in trial.config["unit"]["trials"]]


def make_searcher(queue: ForkQueue):
    """The Tune Searcher that hands out a sweep's packs in ``queue``'s order (see ForkQueue),
    telling it the epochs and fork files each trial reports and when each ends."""
    from ray.tune.search import Searcher

    class ForkSearcher(Searcher):
        def __init__(self):
            super().__init__()
            self.members: dict[str, list[str]] = {}  # Tune's trial id -> its ablate trials

        def suggest(self, trial_id):
            unit = queue.next()
            if unit is FINISHED:
                return Searcher.FINISHED
            if unit is None:
                return None
            self.members[trial_id] = [params["key"] for params in unit["trials"]]
            return {"unit": unit}

        def on_trial_result(self, trial_id, result):
            if "row/epoch" in result:  # Tune flattens results: "row/epoch"
                queue.reported(result["trial"], int(result["row/epoch"]) + 1,
                               result.get("forks") or ())

        def on_trial_complete(self, trial_id, result=None, error=False):
            for key in self.members.get(trial_id, ()):
                queue.ended(key)

        def save(self, checkpoint_path):  # nothing to restore: each `ablate run` plans anew
            Path(checkpoint_path).write_text(json.dumps(queue.waiting))

        def restore(self, checkpoint_path):
            pass

    return ForkSearcher()


def make_callback(run: RunDir, configs: dict[str, TrialConfig], states: dict[str, str],
                  progress, watch: WaitWatch, loggers: Loggers):
    """The driver's one writer: each trial's messages to the run folder (see
    :func:`ablation.worker.receive`) and then to ``--log``'s backends (:mod:`ablation.loggers`),
    trial states and what pending trials wait for. A Tune
    trial is a pack of ablate trials, each with its own state; a trial that reports ``failed``
    (see ablate_trial) is marked errored with that line and stays so when its trainable then
    returns."""
    from ray import tune

    failed: set[str] = set()

    class StoreCallback(tune.Callback):
        def _state(self, trial, state: str, trials) -> None:
            for key in _members(trial):
                if key not in failed:
                    states[key] = state
            watch.update(trials, force=True)
            run.write_states(states, waiting=watch.line)
            progress.update_states(states)

        def on_step_end(self, iteration, trials, **info):
            if watch.update(trials):
                run.write_states(states, waiting=watch.line)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._state(trial, "running", trials)

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._state(trial, "running", trials)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "trial" not in result:
                return  # Tune's own results (none is expected)
            key = result["trial"]
            receive(run, configs, result)
            loggers.received(result)
            if "row" in result:
                # refreshes the heartbeat that `ablate status` reads
                run.write_states(states, waiting=watch.line)
                progress.epoch(key, result["row"])
            if "failed" in result:
                failed.add(key)
                states[key] = "errored"
                run.write_states(states, waiting=watch.line)
                progress.update_states(states)

        def on_trial_complete(self, iteration, trials, trial, **info):
            for key in _members(trial):
                loggers.end(key, failed=key in failed)
                if key not in failed:
                    run.clear_error(key)
            self._state(trial, "done", trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            error = getattr(trial, "error_file", None)
            text = Path(error).read_text() if error and Path(error).exists() else "unknown error"
            for key in _members(trial):
                run.mark_errored(key, text)
                loggers.end(key, failed=True)
            self._state(trial, "errored", trials)

    return StoreCallback()


class WaitWatch:
    """What the pending trials wait for, as one line for state.json (None when none waits). A
    trial counts once it has been pending for WAIT_CHECK_S: Tune keeps a trial PENDING while its
    worker starts too, on resources already given to it."""

    def __init__(self, request: dict[str, float], max_concurrent: int | None):
        self.request, self.max_concurrent = request, max_concurrent
        self.line: str | None = None
        self.queue: ForkQueue | None = None  # the trials it holds are no Tune trials yet
        self.since: dict[str, float] = {}  # trial key -> when it was first seen pending
        self.checked = time.monotonic()

    def update(self, trials, force: bool = False) -> bool:
        """Look again (at most every WAIT_CHECK_S unless forced); True when the line changed."""
        import ray

        now = time.monotonic()
        if not force and now - self.checked < WAIT_CHECK_S:
            return False
        self.checked = now
        pending = {_key(t): len(_members(t)) for t in trials if t.status == "PENDING"}
        self.since = {key: self.since.get(key, now) for key in pending}
        waiting = sum(n for key, n in pending.items() if now - self.since[key] >= WAIT_CHECK_S)
        running = sum(t.status == "RUNNING" for t in trials)
        if not waiting:
            line = None
        elif self.max_concurrent and running >= self.max_concurrent:
            line = (f"{waiting} trial(s) wait for a free slot (--max-concurrent "
                    f"{self.max_concurrent})")
        elif not fits_a_node(self.request):
            line = waits_for_autoscaler(waiting, self.request)
        else:
            free = {k: ray.available_resources().get(k, 0.0) for k in self.request}
            if all(free[k] >= v for k, v in self.request.items()):
                # what they asked for is there: Ray is starting their worker processes, which
                # takes a minute or more on a busy node
                line = f"{waiting} trial(s) starting (Ray starts a worker process for each)"
            else:
                line = (f"{waiting} trial(s) wait for {fmt_resources(self.request)} (free now: "
                        f"{fmt_resources(free)})")
        forks = len(self.queue.waiting) if self.queue else 0
        if forks:
            line = "; ".join(filter(None, [line, f"{forks} trial(s) wait for their baseline's "
                                                  "fork checkpoint"]))
        changed, self.line = line != self.line, line
        return changed


def run_sweep(run: RunDir, todo: dict[str, TrialConfig], *, cluster: str | None,
              cpus_per_trial: float, gpus_per_trial: float | None, max_concurrent: int | None,
              max_failures: int, autoattack: int | None, progress, loggers: Loggers,
              forks: dict[str, Fork] | None = None, packs: list[list[str]] | None = None,
              echo=lambda message: None) -> dict[str, str]:
    """Dispatch the trials through Ray Tune, inside ``ray_cluster`` (which names the ``cluster``
    joined, None for a local Ray); returns the final state of each trial.

    ``gpus_per_trial=None`` means one GPU per trial if the Ray cluster has GPUs, else none.
    A trial no node can hold is one line (AblateError, see wait_for_capacity). Ctrl-C (and
    SIGTERM, under cli.main) raises KeyboardInterrupt here, with no trial marked. ``forks`` (see
    :mod:`ablation.fork`) start trials from their baseline's checkpoint; None trains every trial
    from its first epoch. ``packs`` (:func:`ablation.store.plan_packs`) are trained one Tune
    trial each, with ``--cpus-per-trial`` and ``--gpus-per-trial``; None: a trial each.
    ``loggers`` (``--log``, :class:`ablation.loggers.Loggers`) log each message after the store.
    """
    import ray
    from ray import tune

    if gpus_per_trial is None:  # ask the cluster, not this machine: the head may have no GPU
        gpus_per_trial = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    request = {"CPU": cpus_per_trial, **({"GPU": gpus_per_trial} if gpus_per_trial else {})}
    watch = WaitWatch(request, max_concurrent)
    if wait_for_capacity(request, joined=cluster is not None,
                         where=cluster or "this machine's Ray"):
        watch.line = waits_for_autoscaler(len(todo), request)
        echo(watch.line)
    states = {key: "pending" for key in todo}
    run.write_states(states, waiting=watch.line)
    threads = max(1, int(cpus_per_trial))
    waits = fork_waits(forks or {}, todo, run.have())
    params = trial_params(run, todo, threads, autoattack, waits)
    units, waiting = dispatch_units(params, packs or [[key] for key in todo], waits)
    run.write_states(states, waiting=watch.line, packs={
        params["key"]: unit["key"] for unit in units for params in unit["trials"]
        if len(unit["trials"]) > 1})
    watch.queue = ForkQueue(units, waiting, waits.ready)
    trainable = tune.with_resources(ablate_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(watch.queue), num_samples=len(units),
            max_concurrent_trials=max_concurrent,
            trial_name_creator=_key, trial_dirname_creator=_key),
        run_config=tune.RunConfig(
            name=time.strftime("tune-%Y%m%d-%H%M%S"), storage_path=str(run.root / files.RAY_DIR),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[make_callback(run, todo, states, progress, watch, loggers)], verbose=0),
    )
    try:
        tuner.fit()
    except Exception as err:  # Tune re-raises an error of a callback (the driver's writes) as a
        cause = err  # TuneError holding only its text: raise the OSError itself (a full disk)
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
    return states
