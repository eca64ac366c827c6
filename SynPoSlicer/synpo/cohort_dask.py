"""Dask for `synpo cohort`: the worker plugin that holds the models, the local cluster's size, and
the checks of the addresses given (before anything starts).

SynPoModels is registered on every worker (under PLUGIN_NAME) and loads the models there once;
a task takes them with worker_models(). local_sizing -> (workers, threads per worker, memory limit
per worker in bytes), local_cluster starts that LocalCluster. The worker processes import this
module too (the plugin is pickled by reference to it); torch is imported where the models load."""
import logging
import os
from typing import Optional

from .errors import SynPoError

PLUGIN_NAME = "synpo-models"

try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:                      # the module imports without Dask; running a cohort needs it
    WorkerPlugin = object


class SynPoModels(WorkerPlugin):
    """Loads the models once per worker (again on a worker that restarts); tasks take them from
    the worker (worker_models)."""

    idempotent = False

    def __init__(self, spec: dict, threads: Optional[int], local: bool = False):
        self.spec, self.threads, self.local = dict(spec), threads, local
        self.models = None

    async def setup(self, worker):
        import asyncio
        import signal
        import torch
        if self.local:
            # A local cluster's worker processes share the terminal's process group: Ctrl+C reached them too,
            # and a second one interrupted their closing (a traceback). The command closes them itself.
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            except ValueError:           # (not the process's main thread: left as it is)
                pass
        threads = self.threads
        if not threads:                  # the cores this process may use, shared by its task slots
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads = max(1, cores // max(1, worker.state.nthreads))
        torch.set_num_threads(int(threads))
        from .session import Models
        loop = asyncio.get_running_loop()     # the worker's event loop keeps answering meanwhile
        self.models = await loop.run_in_executor(None, lambda: Models.load(quiet=True, **self.spec))

    def teardown(self, worker):
        self.models = None


def worker_models():
    from distributed import get_worker
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if plugin is None or plugin.models is None:
        raise SynPoError("the worker has no SynPo models (its plugin failed to load them; see the worker's log)")
    return plugin.models


def local_sizing(args):
    """(workers, threads per worker, memory limit per worker in bytes) of the local cluster; SynPoError
    for --workers the memory cannot hold (checked before anything is planned or started)."""
    import psutil
    from dask.utils import format_bytes
    from .config import COHORT_THREADS_PER_WORKER
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads_per_worker or COHORT_THREADS_PER_WORKER
    workers = args.workers or max(1, cores // threads)
    if args.memory_limit in (None, "auto"):
        total = int(psutil.virtual_memory().total)
        if not args.workers:             # no more workers by default than the memory holds (many cores, little memory)
            workers = max(1, min(workers, total // MIN_WORKER_MEMORY))
        memory = total // workers
        if args.workers and memory < MIN_WORKER_MEMORY:     # as --memory-limit under 2GB is refused
            raise SynPoError("--workers %d: this machine's memory / %d is %s per worker, under the 2GB a worker "
                             "needs; give fewer workers, or --memory-limit" % (workers, workers, format_bytes(memory)))
    else:
        memory = memory_limit(args.memory_limit)
    return workers, threads, memory


def local_cluster(args, say):
    from dask.utils import format_bytes
    from distributed import LocalCluster
    workers, threads, memory = local_sizing(args)
    dashboard = None if str(args.dashboard).lower() == "none" else args.dashboard
    # With no dashboard the scheduler still serves its HTTP routes (health, metrics), on 8787 unless
    # told otherwise (distributed's Scheduler: default_port 8787), warning when that port is taken.
    quiet_http = {"dashboard_address": ":0"} if dashboard is None else None
    try:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory,
                               dashboard_address=dashboard, silence_logs=logging.ERROR,
                               scheduler_kwargs=quiet_http)
    except Exception as exc:             # (a worker process that cannot start: a traceback before)
        cause = exc.__cause__ or exc.__context__
        raise SynPoError("the local Dask cluster did not start: %s%s" % (
            one_line(exc), " (%s)" % one_line(cause) if cause is not None else "")) from None
    say("cohort: local cluster, %d worker process%s x %d thread%s, memory limit %s per worker"
        % (workers, "es" if workers > 1 else "", threads, "s" if threads > 1 else "",
           format_bytes(memory) if memory else "none"))
    return cluster, threads


# A worker holds torch and the models (LiteMedSAM: 1.04 GiB resident once loaded, measured) and Dask pauses
# a worker at 80 % of its limit: under 2 GiB one died while loading the models, or sat paused for good.
MIN_WORKER_MEMORY = 2 * 10 ** 9                 # "2GB" as Dask reads it


def memory_limit(text: str) -> int:
    """--memory-limit in bytes (0: no limit, as Dask reads it); SynPoError for anything else than a size
    of at least MIN_WORKER_MEMORY."""
    from dask.utils import parse_bytes
    try:
        memory = int(parse_bytes(text))
    except (ValueError, TypeError):
        raise SynPoError("--memory-limit %r: give a size such as 6GB" % text) from None
    zero = not any(d in str(text) for d in "123456789")       # ("0.5": Dask rounds it to 0 bytes, not "no limit")
    if (memory != 0 or not zero) and memory < MIN_WORKER_MEMORY:
        raise SynPoError("--memory-limit %r: give a size of at least 2GB per worker (0: no limit)" % text)
    return memory


def check_dashboard_address(address: str) -> None:
    """SynPoError unless `address` is [HOST]:PORT or PORT with a port number and a host this machine
    resolves (LocalCluster failed on it after the cluster had begun to start, with a traceback)."""
    import socket
    host, _, port = str(address).rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SynPoError("--dashboard %r: give :PORT or HOST:PORT (e.g. :8787), or none" % address)
    host = host.strip("[]")
    if host:
        try:
            socket.getaddrinfo(host, int(port))
        except (socket.gaierror, UnicodeError) as exc:
            raise SynPoError("--dashboard %r: host %s: %s" % (address, host, getattr(exc, "strerror", None) or exc)) \
                from None


def check_scheduler_address(address: str) -> None:
    """SynPoError unless `address` reads as a Dask scheduler's (tcp://HOST:PORT, HOST:PORT, tls://...)."""
    from distributed.comm.addressing import get_address_host_port
    try:
        get_address_host_port(address)
    except ValueError as exc:
        raise SynPoError("--scheduler %r is not a scheduler address (%s): give tcp://HOST:PORT" % (address, exc)) \
            from None


def serves_dashboard(client) -> bool:
    """Whether the user's scheduler serves a dashboard page: its `services` list "dashboard" for its HTTP
    routes also when it was started with --no-dashboard (the page then answers 404)."""
    import urllib.request
    if "dashboard" not in client.scheduler_info().get("services", {}):
        return False
    try:
        with urllib.request.urlopen(client.dashboard_link, timeout=3) as answer:
            return answer.status == 200
    except Exception:
        return False


def one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return ("%s: %s" % (type(exc).__name__, text[0]) if text else type(exc).__name__)[:500]


def task_error(exc) -> str:
    if type(exc).__name__ == "KilledWorker":
        return "its worker died while segmenting it, again and again (out of memory? see --memory-limit)"
    return one_line(exc)
