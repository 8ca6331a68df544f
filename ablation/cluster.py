"""Ray for one ``ablate run``: joining a cluster or starting a Ray of this machine alone, and
whether a node can hold a trial. A wrong address, a refused token, no cluster and a cluster too
small are each one line (AblateError or ConfigError), in seconds, where Ray itself would retry
for minutes, print its C++ core's log, or wait forever.

Ray is imported inside the functions, as in :mod:`ablation.tune`: ``parse_address`` checks
``--address`` before Ray (or torch) loads.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AblateError, ConfigError

# --- joining Ray: a wrong address, a refused token or no cluster is one line ------------------

CONNECT_TIMEOUT_S = 5.0  # a live head accepts a TCP connection in milliseconds; 5 s allows a VPN
JOIN_GRACE_S = 30.0  # a joined cluster's workers may still be registering (KubeRay pods, srun)
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
             log_to_driver=False, logging_level=logging.WARNING)  # no "Started a local Ray" 
    token = Path.home() / ".ray" / "auth_token"  # Ray writes it readable by every local user
    try:
        info = token.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            token.chmod(0o600)  # who reads it can run code in this Ray (and any that shares it)
    except OSError:
        pass


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
    # Tune's automatic JSON, CSV and TensorBoard loggers would write each trial's results under
    # ray/, split per pack and per resume: the store holds them, and --log logs them per trial.
    # Without their files, Tune's result grid warns per trial that it found none; ablate reads
    # the store, never the grid.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # and its closing INFO line ("Wrote the latest version of all result files ...") names ray/,
    # which holds nothing to read: the run folder's store and `ablate status` do
    logging.getLogger("ray.tune.tune").setLevel(logging.WARNING)
    # Tune's own Ctrl-C handling stops the trials, marks them and advises Tuner.restore, which
    # ablate does not use (rerunning the command resumes): let KeyboardInterrupt through instead.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Tune warns "... may be a performance bottleneck" when one of its driver steps takes over
    # 0.5 s; ours include writing an epoch to the Parquet store (fsync'd, and pushed for a URI),
    # so on a busy machine ~30 such lines crossed the demo's progress bar, advising to report
    # less often, which does not apply. Read when ray.tune is first imported (in run_sweep).
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "60")
    source = "--address"
    if not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # see _start_local
        # Ray 2.60 turns token authentication on for a new local Ray when RAY_AUTH_MODE is unset,
        # and warns so on every start; set explicitly it does the same without the warning.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
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


# --- capacity: can a node of the cluster hold a trial? -------------------------------------


def fmt_resources(resources: dict[str, float]) -> str:
    """Resources as messages show them: ``{CPU: 4, GPU: 0.5}``."""
    return "{" + ", ".join(f"{name}: {value:g}" for name, value in resources.items()) + "}"


def _largest(request: dict[str, float]) -> dict[str, float]:
    """The most of each requested resource that one alive node of the cluster has."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return {name: max((n.get(name, 0.0) for n in nodes), default=0.0) for name in request}


def fits_a_node(request: dict[str, float]) -> bool:
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


def waits_for_autoscaler(pending: int, request: dict[str, float]) -> str:
    return (f"{pending} trial(s) wait for {fmt_resources(request)}: no node has it now; waiting "
            "for the autoscaler to add one")


def wait_for_capacity(request: dict[str, float], joined: bool, where: str) -> bool:
    """Return when one node can hold a trial's ``request`` (False), or at once when none can but
    an autoscaler may add one (True); raise a one-line AblateError when no node can and none
    will: at once for a local Ray, after JOIN_GRACE_S for a joined cluster."""
    deadline = time.monotonic() + (JOIN_GRACE_S if joined else 0.0)
    while not fits_a_node(request):
        if joined and _autoscaling():
            return True
        if not joined:
            raise AblateError(f"a trial asks for {fmt_resources(request)} but {where} has "
                              f"{fmt_resources(_largest(request))}; lower --cpus-per-trial/"
                              "--gpus-per-trial or join a cluster that has them (--address)")
        if time.monotonic() >= deadline:
            raise AblateError(
                f"no node of {where} can hold a trial's {fmt_resources(request)} (the most one "
                f"has: {fmt_resources(_largest(request))}, after {JOIN_GRACE_S:.0f} s for nodes to "
                "join); lower --cpus-per-trial/--gpus-per-trial or add a node that has them")
        time.sleep(2.0)
    return False
