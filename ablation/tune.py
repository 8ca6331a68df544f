"""Ray Tune as the dispatcher: one Tune trial per ablate trial; the trainer stays Ray-free.

Resuming does not depend on Tune's experiment restore (which, measured on Ray 2.60, can restart
trials from epoch 0 or lose trials added to the grid): every ``ablate run`` starts a Tune experiment
over the trials that are not done, and each trial resumes from the checkpoint in its own folder
``trials/<key>/``. The driver's curve store dedupes on (trial, epoch), so an epoch that is reported
again after a crash is stored once.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import files
from .config import TrialConfig, from_dict
from .datafiles import check_data
from .errors import AblateError, ConfigError, DataError, RunFailed
from .evaluate import write_summary
from .fork import Fork
from .io import load_torch
from .store import RunDir, trial_params
from .trainer import Reporter, Trainer


class TuneReporter(Reporter):
    """Reports each epoch to Tune; on start it replays the epochs a checkpoint already holds, so
    the driver's store is complete even if an earlier driver died before receiving them.

    At a URI, each epoch's files go up on a background thread while the next epoch trains (a
    worker killed before its checkpoint arrives costs that epoch again, never a wrong one: the
    resumed trial recomputes it, bit for bit on a CPU, to rounding on a GPU); a fork file is sent
    before its epoch is reported, since the driver then releases the trials that start from it,
    maybe on another node. Each report names the fork files the trial folder holds."""

    def __init__(self, run: RunDir, workdir: Path):
        from .remote import BackgroundUploads

        self.run, self.workdir = run, workdir
        self.uploads = BackgroundUploads(run.remote, run.root) if run.remote else None

    def _report(self, row) -> None:
        from ray import tune

        forks = sorted(int(p.stem.split("-")[1])  # fork-<epochs>.pt files
                       for p in self.workdir.glob(files.fork_checkpoint("*")))
        tune.report({"row": row, "pid": os.getpid(), "forks": forks})

    def start(self, config, history):
        for row in history:
            self._report(row)

    def written(self, paths, removed):
        if self.uploads:
            self.uploads.submit(paths, removed)
            if any(p.name.startswith("fork-") for p in paths):
                self.uploads.flush()

    def epoch(self, row, checkpoint):
        self._report(row)

    def flush(self) -> None:
        if self.uploads:
            self.uploads.flush()


def trial_device(device: str, gpu_ids: Sequence[Any]) -> str:
    """The ``device`` a trial trains on, from its config's field and the GPUs Ray gave it.

    Ray 2.60 no longer hides the GPUs from a trial that asked for none (CUDA_VISIBLE_DEVICES
    stays as it was), so without this ``auto`` would put every such trial on GPU 0, which Ray
    does not account for. A trial given a GPU sees only its own, as cuda:0."""
    if gpu_ids:
        return device
    if device == "auto":
        return "cpu"
    if device.startswith("cuda"):
        raise ConfigError(f"key 'device': {device!r} asks for a GPU, but Ray gave this trial "
                          "none; pass --gpus-per-trial (e.g. 1, or 0.5 to share one) or set "
                          "device: auto")
    return device


def ablate_trial(params: dict[str, Any]) -> None:
    """The Tune trainable (its name must stay stable): train or resume one trial in its folder.

    A failure that a retry cannot fix (RunFailed: a diverged loss, a training step out of GPU
    memory; AblateError: a foreign checkpoint, missing data, a device Ray did not give) is
    reported to the driver as one line, ``{"failed": ...}``, and the trainable returns: Tune
    would retry an exception ``--max-failures`` times, failing the same way each time. Any
    other exception (a lost worker, a bug) is left to Tune's retries."""
    import ray
    from ray import tune

    spec = params["trial"]
    key = spec["key"]
    try:
        summary = _train_trial(spec, ray.get_gpu_ids())
    except (RunFailed, AblateError) as err:
        line = " ".join(str(err).split())  # error.txt holds one line, naming the trial
        tune.report({"failed": line if key in line else f"trial {key}: {line}",
                     "pid": os.getpid()})
        return
    tune.report({"summary": summary, "pid": os.getpid()})


def _train_trial(spec: dict[str, Any], gpu_ids: Sequence[Any]) -> dict[str, Any]:
    """Train or resume the trial ``spec`` describes, on the GPUs Ray gave it; its summary."""
    import torch

    key, config = spec["key"], from_dict(spec["config"], source=spec["key"])
    config = config.replace(device=trial_device(config.device, gpu_ids))  # not part of the key
    fork = Fork(**spec["fork"]) if spec.get("fork") else None
    try:  # this node's copy of the data, before anything is pulled or trained
        check_data(config.dataset, config.data_root, config.download)
    except DataError as err:
        raise DataError(f"on node {socket.gethostname()}: {err}") from None
    run = RunDir.attach(spec["run"])  # on another node, a URI's mirror on that node
    workdir = run.trial_dir(key)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(spec["threads"])))
    with open(workdir / ".lock", "w") as lock:
        # A worker orphaned by a killed driver may still hold this trial; wait for it to end
        # rather than write the same checkpoint from two processes.
        fcntl.flock(lock, fcntl.LOCK_EX)
        # The URI's copy is the truth, not this node's.
        for name in (files.SUMMARY, files.ATTEMPTS,
                     *(files.fork_checkpoint(e) for e in spec.get("fork_points", ()))):
            run.sync(files.trial_file(key, name))
        if run.sync(files.trial_file(key, files.CHECKPOINT)):
            best = load_torch(workdir / files.CHECKPOINT).get("best_epoch")
            if best is not None:  # else a 0.2.0 checkpoint, which holds the best weights
                run.sync(files.trial_file(key, files.best_checkpoint(best)))
        elif fork:
            run.sync(files.trial_file(fork.parent, files.fork_checkpoint(fork.epochs)))
        trainer = Trainer(config, workdir, fork=fork, fork_points=spec.get("fork_points", ()))
        start = f"starts at epoch {trainer.epochs_done}" + (
            f" from {trainer.forked_from}'s checkpoint" if trainer.forked_from else "")
        with open(workdir / files.ATTEMPTS, "a") as log:  # one line per start: resumed where
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} on "
                      f"{socket.gethostname()} {start}, device {trainer.device}\n")
        run.push(workdir / files.ATTEMPTS)
        reporter = TuneReporter(run, workdir)
        try:
            history = trainer.fit(reporter)
        finally:  # the last checkpoint is at the URI before the summary says done, and before
            reporter.flush()  # a failure is reported: the next run resumes from it
        trainer.release()  # the GPU memory of training, before AutoAttack needs its own
        summary = write_summary(config, workdir, history, autoattack=spec.get("autoattack"),
                                data=trainer.data, weights_changed=not trainer.finished_at_start)
        run.push(workdir / files.SUMMARY)
    return summary


class SweepProgress:
    """A live bar over every epoch of the sweep, with trial counts by state."""

    def __init__(self, total_epochs: int, stored: set[tuple[str, int]], quiet: bool):
        from tqdm import tqdm

        self.seen = set(stored)  # (key, epoch) already in the store: a replay adds nothing
        self.bar = tqdm(total=total_epochs, initial=len(self.seen), unit="epoch", disable=quiet,
                        dynamic_ncols=True, mininterval=0.5)

    def epoch(self, key: str, row: dict[str, Any]) -> None:
        if (key, row["epoch"]) not in self.seen:
            self.seen.add((key, row["epoch"]))
            self.bar.update(1)

    def update_states(self, states: dict[str, str]) -> None:
        counts = {s: sum(v == s for v in states.values()) for s in ("running", "done", "errored")}
        self.bar.set_postfix_str(", ".join(f"{n} {s}" for s, n in counts.items()))

    def close(self) -> None:
        self.bar.close()


def _key(trial) -> str:
    return trial.config["trial"]["key"]


def make_searcher(params: list[dict[str, Any]], waiting: dict[str, Fork],
                  ready: set[tuple[str, int]]):
    """The Tune Searcher that hands out a sweep's trials: first the baselines that other trials
    fork from, then the trials that wait for nothing, and each trial in ``waiting`` once its
    parent's fork file exists (``suggest`` says None until then; ``ready`` holds the (parent,
    epochs) files that exist already). A waiting trial whose file cannot come any more, because
    its parent went past the fork point without writing it or ended, is handed out without its
    fork and trains from scratch: nothing waits forever."""
    from ray.tune.search import Searcher

    class ForkSearcher(Searcher):
        def __init__(self):
            super().__init__()
            parents = {f.parent for f in waiting.values()}
            self.queue = sorted((p for p in params if p["key"] not in waiting),
                                key=lambda p: p["key"] not in parents)  # stable: parents first
            self.waiting = {p["key"]: p for p in params if p["key"] in waiting}
            self.ready, self.ended = set(ready), set()
            self.epochs: dict[str, int] = {}  # epochs each running trial has reported
            self.keys: dict[str, str] = {}  # Tune's trial id -> ablate key

        def suggest(self, trial_id):
            for key, p in list(self.waiting.items()):
                fork = waiting[key]
                if (fork.parent, fork.epochs) in self.ready:
                    self.queue.append(self.waiting.pop(key))
                elif fork.parent in self.ended or self.epochs.get(fork.parent, 0) >= fork.epochs:
                    self.queue.append({**self.waiting.pop(key), "fork": None})
            if not self.queue:
                return None if self.waiting else Searcher.FINISHED
            p = self.queue.pop(0)
            self.keys[trial_id] = p["key"]
            return {"trial": p}

        def on_trial_result(self, trial_id, result):
            key = self.keys.get(trial_id)  # Tune flattens results: "row/epoch"
            if key is not None and "row/epoch" in result:
                self.epochs[key] = max(self.epochs.get(key, 0), int(result["row/epoch"]) + 1)
                self.ready.update((key, int(e)) for e in result.get("forks") or ())

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.ended.add(self.keys.get(trial_id))

        def save(self, checkpoint_path):  # nothing to restore: each `ablate run` plans anew
            Path(checkpoint_path).write_text(json.dumps(sorted(self.waiting)))

        def restore(self, checkpoint_path):
            pass

    return ForkSearcher()


def make_callback(run: RunDir, configs: dict[str, TrialConfig], states: dict[str, str],
                  progress, watch: WaitWatch):
    """The driver's one writer: epoch rows to the curve store, summaries, trial states and
    what pending trials wait for. A trial that reports ``failed`` (see ablate_trial) is marked
    errored with that line and stays so when its trainable then returns."""
    from ray import tune

    failed: set[str] = set()

    class StoreCallback(tune.Callback):
        def _state(self, trial, state: str, trials) -> None:
            states[_key(trial)] = state
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
            key = _key(trial)
            if "row" in result:
                run.add_epochs(configs[key], [result["row"]])
                # refreshes the heartbeat that `ablate status` reads
                run.write_states(states, waiting=watch.line)
                progress.epoch(key, result["row"])
            if "summary" in result:  # the worker wrote and pushed summary.json before this
                run.rebuild_summaries()
            if "failed" in result:
                failed.add(key)
                run.mark_errored(key, result["failed"] + "\n")
                self._state(trial, "errored", trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            if _key(trial) in failed:
                return
            run.clear_error(_key(trial))
            self._state(trial, "done", trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            error = getattr(trial, "error_file", None)
            text = Path(error).read_text() if error and Path(error).exists() else "unknown error"
            run.mark_errored(_key(trial), text)
            self._state(trial, "errored", trials)

    return StoreCallback()


# --- joining Ray: a wrong address, a refused token or a cluster too small is one line ----------

CONNECT_TIMEOUT_S = 5.0  # a live head accepts a TCP connection in milliseconds; 5 s allows a VPN
JOIN_GRACE_S = 30.0  # a joined cluster's workers may still be registering (KubeRay pods, srun)
WAIT_CHECK_S = 5.0  # how often the driver looks at what pending trials wait for (state.json)
# Ray's connection attempts when joining (its default 20 costs ~35 s each where no GCS answers,
# ~1 s each where a token is refused). The TCP check below has already found a listener, so one
# attempt says what is wrong; an explicit RAY_gcs_server_port_wait_time_s is kept.
JOIN_ATTEMPTS = "1"


def parse_address(address: str, source: str = "--address") -> tuple[str, int] | None:
    """``auto`` (None: Ray looks for the cluster) or ``HOST:PORT`` (IPv6 as ``[::1]:6379``);
    anything else is a one-line ConfigError naming ``source``."""
    if address == "auto":
        return None
    hint = (f"{source} {address!r}: expected 'auto' or HOST:PORT, the head's GCS port "
            "(`ray start --head --port`, 6379 by default)")
    if "://" in address:
        raise ConfigError(hint + "; Ray Client (ray://) and dashboard (http://) addresses do "
                                 "not work here")
    host, _, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not host or (":" in host and not bracketed) or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ConfigError(hint)
    return host, int(port)


def _check_reachable(where: str, host: str, port: int) -> None:
    """A plain TCP connection first: where nothing listens, ray.init retries for minutes."""
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except socket.gaierror:
        raise AblateError(f"{where}: unknown host {host!r}; check the name or give the head's "
                          "IP") from None
    except ConnectionRefusedError:
        raise AblateError(f"{where}: nothing listens there; start the head (`ray start --head "
                          f"--port={port}`) or fix the address") from None
    except TimeoutError:
        raise AblateError(f"{where}: no answer within {CONNECT_TIMEOUT_S:.0f} s (no such "
                          "machine, or a firewall); check the address") from None
    except OSError as err:
        raise AblateError(f"{where}: cannot connect ({err.strerror or err})") from None


@contextmanager
def _stderr_held() -> Iterator[dict[str, str]]:
    """Hold what is written to file descriptor 2 meanwhile, for the caller to replay or drop:
    Ray's C++ core logs every failed connection attempt there, out of Python's reach."""
    sys.stderr.flush()
    saved = os.dup(2)
    held: dict[str, str] = {}
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            held["text"] = tmp.read().decode(errors="replace")


def _join_failure(where: str, err: BaseException) -> str:
    """The one line for a failed ``ray.init(address=...)``, from the text of its chained errors."""
    import ray

    chain: list[BaseException] = []
    while err is not None and len(chain) < 8:
        chain.append(err)
        err = err.__cause__ or err.__context__
    text = " ".join(str(e) for e in chain)
    get_token = "`ray get-auth-token` on the head prints it"
    if "no authentication token was found" in text:
        return (f"RAY_AUTH_MODE=token but this machine has no Ray token; set RAY_AUTH_TOKEN to the "
                f"cluster's token or write it to ~/.ray/auth_token ({get_token})")
    if "InvalidAuthToken" in text or "Unauthenticated" in text:
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            return (f"{where}: the Ray cluster refused this machine's token; set RAY_AUTH_TOKEN "
                    f"(or ~/.ray/auth_token) to the cluster's token ({get_token})")
        return (f"{where}: the Ray cluster there requires token authentication; set "
                f"RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token "
                f"({get_token})")
    if "Could not find any running Ray instance" in text:
        return (f"{where}: no Ray cluster runs on this machine; start one (`ray start --head`) "
                "or give the head's HOST:PORT")
    first = next((line.strip() for line in str(chain[0]).splitlines() if line.strip()),
                 type(chain[0]).__name__)
    return (f"{where}: cannot join the Ray cluster there ({first}); check that it is the head's "
            f"GCS port (6379 by default) and that the cluster runs Ray {ray.__version__}")


def _join(address: str, source: str = "--address") -> None:
    """``ray.init`` on an existing cluster, or one line saying why not (exit 2)."""
    where = f"{source} {address}"
    hostport = parse_address(address, source)
    if hostport:
        _check_reachable(where, *hostport)
    import ray

    budget = "RAY_gcs_server_port_wait_time_s"
    given = os.environ.get(budget)
    os.environ[budget] = given or JOIN_ATTEMPTS
    failure = None
    with _stderr_held() as held:
        try:  # "auto" reads RAY_ADDRESS, and (as for None) finds ~/.ray/auth_token by itself
            ray.init(address="auto" if source == "RAY_ADDRESS" else address, log_to_driver=False)
        except Exception as err:  # ConnectionError, RuntimeError, AuthenticationError, ...: Ray
            failure = _join_failure(where, err)  # has several; each becomes one line
        finally:
            if given is None:
                os.environ.pop(budget)
    if failure:
        raise AblateError(failure)
    sys.stderr.write(held["text"])  # Ray's own lines of a successful join, as they were


def _start_local() -> None:
    """A Ray of this machine alone, listening on the loopback interface only.

    Ray 2.60 binds its gRPC servers (GCS, raylet, workers) to the node's IP, which it takes from
    the default route; ``_node_ip_address="127.0.0.1"`` is turned back into that IP. The one
    switch that keeps 127.0.0.1 is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (despite its name it is
    read on Linux too: without it Ray "uses the loopback IP as the local IP"), read when ray is
    first imported, so the caller sets it before. Measured with ``ss -ltnp``: every listener of
    the local Ray is then on 127.0.0.1; without it, on all interfaces.
    """
    import ray

    ray.init(address="local", include_dashboard=False, dashboard_host="127.0.0.1",
             log_to_driver=False)
    token = Path.home() / ".ray" / "auth_token"  # Ray writes it readable by every local user
    try:
        info = token.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            token.chmod(0o600)  # who reads it can run code in this Ray (and any that shares it)
    except OSError:
        pass


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {value:g}" for name, value in resources.items()) + "}"


def _largest(request: dict[str, float]) -> dict[str, float]:
    """The most of each requested resource that one alive node of the cluster has."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return {name: max((n.get(name, 0.0) for n in nodes), default=0.0) for name in request}


def _fits_a_node(request: dict[str, float]) -> bool:
    """Whether one alive node can hold a trial: Tune places a trial's resources in one bundle,
    which must fit on one node (the cluster's total is not enough)."""
    import ray

    return any(n["Alive"] and all(n["Resources"].get(k, 0.0) >= v for k, v in request.items())
               for n in ray.nodes())


def _autoscaling() -> bool:
    """Whether an autoscaler may add nodes: Ray's v2 autoscaler runs (what `ray up` and KubeRay
    start), or the v1 autoscaler reports node types from a config. A plain `ray start` cluster
    runs the v1 monitor read-only, and it names its node types after live nodes (``node_<id>``).
    Ray exposes this only through the autoscaler's own records; if they cannot be read, assume an
    autoscaler (waiting, and saying so, is the old behaviour)."""
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS
        report = (json.loads(status).get("autoscaler_report") or {}) if status else {}
    except Exception:  # private records of Ray's autoscaler: any failure means "cannot tell"
        return True
    types = {*(report.get("node_type_mapping") or {}).values(), *(report.get("active_nodes") or {}),
             *(report.get("pending_launches") or {})}
    return any(not name.startswith("node_") for name in types)


def _waits_for_autoscaler(pending: int, request: dict[str, float]) -> str:
    return (f"{pending} trial(s) wait for {_fmt(request)}: no node has it now; waiting for the "
            "autoscaler to add one")


def wait_for_capacity(request: dict[str, float], joined: bool, where: str) -> bool:
    """Return when one node can hold a trial's ``request`` (False), or at once when none can but
    an autoscaler may add one (True); raise a one-line AblateError when no node can and none
    will: at once for a local Ray, after JOIN_GRACE_S for a joined cluster."""
    deadline = time.monotonic() + (JOIN_GRACE_S if joined else 0.0)
    while not _fits_a_node(request):
        if joined and _autoscaling():
            return True
        if not joined:
            raise AblateError(f"a trial asks for {_fmt(request)} but {where} has "
                              f"{_fmt(_largest(request))}; lower --cpus-per-trial/--gpus-per-trial"
                              " or join a cluster that has them (--address)")
        if time.monotonic() >= deadline:
            raise AblateError(
                f"no node of {where} can hold a trial's {_fmt(request)} (the most one has: "
                f"{_fmt(_largest(request))}, after {JOIN_GRACE_S:.0f} s for nodes to join); lower "
                "--cpus-per-trial/--gpus-per-trial or add a node that has them")
        time.sleep(2.0)
    return False


class WaitWatch:
    """What the pending trials wait for, as one line for state.json (None when none waits). A
    trial counts once it has been pending for WAIT_CHECK_S: Tune keeps a trial PENDING while its
    worker starts too, on resources already given to it."""

    def __init__(self, request: dict[str, float], max_concurrent: int | None):
        self.request, self.max_concurrent = request, max_concurrent
        self.line: str | None = None
        self.searcher = None  # the ForkSearcher, whose waiting trials are no Tune trials yet
        self.since: dict[str, float] = {}  # trial key -> when it was first seen pending
        self.checked = time.monotonic()

    def update(self, trials, force: bool = False) -> bool:
        """Look again (at most every WAIT_CHECK_S unless forced); True when the line changed."""
        import ray

        now = time.monotonic()
        if not force and now - self.checked < WAIT_CHECK_S:
            return False
        self.checked = now
        pending = [_key(t) for t in trials if t.status == "PENDING"]
        self.since = {key: self.since.get(key, now) for key in pending}
        waiting = sum(now - self.since[key] >= WAIT_CHECK_S for key in pending)
        running = sum(t.status == "RUNNING" for t in trials)
        if not waiting:
            line = None
        elif self.max_concurrent and running >= self.max_concurrent:
            line = (f"{waiting} trial(s) wait for a free slot (--max-concurrent "
                    f"{self.max_concurrent})")
        elif not _fits_a_node(self.request):
            line = _waits_for_autoscaler(waiting, self.request)
        else:
            free = ray.available_resources()
            line = (f"{waiting} trial(s) wait for {_fmt(self.request)} (free now: "
                    f"{_fmt({k: free.get(k, 0.0) for k in self.request})})")
        forks = len(self.searcher.waiting) if self.searcher else 0
        if forks:
            line = "; ".join(filter(None, [line, f"{forks} trial(s) wait for their baseline's "
                                                  "fork checkpoint"]))
        changed, self.line = line != self.line, line
        return changed


@contextmanager
def ray_cluster(address: str | None) -> Iterator[str | None]:
    """Ray for one ``ablate run``, shut down at the end: the cluster at ``address``, else the one
    in RAY_ADDRESS (which `ray job submit` sets), else a new Ray of this machine alone. Yields
    how to name a joined cluster in messages (None for the local Ray). A wrong address, a refused
    token and no cluster at all are each one line (AblateError), in seconds (see _join). The
    caller's SIGTERM handler stays in place.
    """
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables; ours shows
    # Tune's own Ctrl-C handling stops the trials, marks them and advises Tuner.restore, which
    # ablate does not use (rerunning the command resumes): let KeyboardInterrupt through instead.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    source = "--address"
    if not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # see _start_local
    import ray

    handler = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            _join(address, source)
        else:
            _start_local()
    finally:
        # ray.init replaces the SIGTERM handler: with its core worker's, which dumps a C++ stack
        # and aborts the driver. Put back the caller's (cli.main's stops the command as Ctrl-C
        # does); a SIGTERM during ray.init itself still meets Ray's.
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
    try:
        yield f"the Ray cluster at {address}" if address else None
    finally:
        ray.shutdown()


def run_sweep(run: RunDir, todo: dict[str, TrialConfig], *, cluster: str | None,
              cpus_per_trial: float, gpus_per_trial: float | None, max_concurrent: int | None,
              max_failures: int, autoattack: int | None, progress,
              forks: dict[str, Fork] | None = None,
              echo=lambda message: None) -> dict[str, str]:
    """Dispatch the trials through Ray Tune, inside ``ray_cluster`` (which names the ``cluster``
    joined, None for a local Ray); returns the final state of each trial.

    ``gpus_per_trial=None`` means one GPU per trial if the Ray cluster has GPUs, else none.
    A trial no node can hold is one line (AblateError, see wait_for_capacity). Ctrl-C (and
    SIGTERM, under cli.main) raises KeyboardInterrupt here, with no trial marked. ``forks`` (see
    :mod:`ablation.fork`) start trials from their baseline's checkpoint; None trains every trial
    from its first epoch.
    """
    import ray
    from ray import tune

    if gpus_per_trial is None:  # ask the cluster, not this machine: the head may have no GPU
        gpus_per_trial = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    request = {"CPU": cpus_per_trial, **({"GPU": gpus_per_trial} if gpus_per_trial else {})}
    watch = WaitWatch(request, max_concurrent)
    if wait_for_capacity(request, joined=cluster is not None,
                         where=cluster or "this machine's Ray"):
        watch.line = _waits_for_autoscaler(len(todo), request)
        echo(watch.line)
    states = {key: "pending" for key in todo}
    run.write_states(states, waiting=watch.line)
    threads = max(1, int(cpus_per_trial))
    params, waiting, ready = trial_params(run, todo, threads, autoattack, forks or {})
    trainable = tune.with_resources(ablate_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    watch.searcher = make_searcher(params, waiting, ready)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=watch.searcher, num_samples=len(params),
            max_concurrent_trials=max_concurrent,
            trial_name_creator=_key, trial_dirname_creator=_key),
        run_config=tune.RunConfig(
            name=time.strftime("tune-%Y%m%d-%H%M%S"), storage_path=str(run.root / "ray"),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[make_callback(run, todo, states, progress, watch)], verbose=0),
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
