"""`--engine ray`: the same workers as Ray Data actors, on a local Ray started here or on a cluster (`--ray-address`).

Design decisions
- The plan's batches are the dataset (`ray.data.from_items`, one block per
  batch, each a pickled list of units: a few KB), mapped by a pool of
  model-holding actors (`map_batches` with a callable class,
  `ActorPoolStrategy`, one plan batch per call). Each actor reads its
  units itself, so there is no separate read stage whose tasks the actors
  could starve. The runner pulls outputs one batch at a time
  (`iter_rows`, streaming with backpressure): results cross the object
  store one batch at a time and are never materialised.
- CPU per actor: (cluster CPUs - 0.25) / workers, capped at the largest
  node's CPUs - 0.25, so actors can always be placed and a quarter CPU
  stays free for Ray Data's own tasks (two actors of num_cpus=1 on a
  2-CPU node were measured to hang a job whose read stage got no CPU).
  torch threads per actor follow that share. Where the cluster has GPUs,
  each actor gets `--gpus-per-worker` (default 1) and runs the model there.
- Every actor is started (its model loaded) before the first batch, within
  10 minutes, else the job stops with "not enough resources" rather than
  waiting forever for actors the cluster cannot place.
- Lost workers: actors restart (max_restarts=-1) and a batch whose actor
  died is retried (max_task_retries=3). A batch that kills its worker
  every time (a file crashing a native decoder) is given up after that,
  without stopping the job; its units have no row, the summary counts
  them as missing, and a rerun tries them again.
- A local Ray started here listens on loopback only (Ray's own
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 switch; `_node_ip_address` alone is
  resolved back to the machine's address and its gRPC ports then bind every
  interface, checked), without a dashboard, with usage statistics off (no
  traffic leaves the machine), and with its session files and auth token
  in a private temporary folder that is removed afterwards (Ray 2.60 would
  otherwise write the token to ~/.ray). Joining a cluster uses the
  cluster's own settings; MEDLENS_* settings set here are passed to its
  workers, and every node needs MedLens installed.
- Actor constructors and calls never raise: a model that cannot load
  comes back as BatchOutput.fatal and the run stops with one line (a
  raising constructor would be retried by Ray, printing tracebacks).
  Ray itself still prints one line per run about the pool's constructor
  arguments living in the object store (core_worker.cc): harmless, Ray
  Data keeps them.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import shutil
import sys
import tempfile
import threading
import warnings
from typing import Any, Iterator, Sequence

from engine import settings
from engine.batch.errors import BatchError
from engine.batch.tasks import TaskSpec
from engine.batch.units import Unit
from engine.batch.worker import BatchOutput, HashSet

INSTALL_HINT = '--engine ray needs Ray Data: pip install -e ".[scale]" (or pip install "ray[data]")'
RESERVED_CPUS = 0.25  # kept free of actors for Ray Data's own tasks
MAX_TASK_RETRIES = 3  # a batch whose actor died is retried this often, then given up (its units stay to do)
ACTOR_START_S = 600  # every actor must be up (model loaded) within this, else the job stops saying resources are short
OBJECT_STORE_BYTES = 512 << 20  # local Ray: outputs are small and consumed batch by batch
_LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node address = loopback: every port on 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report to the internet
}


_TOKEN: list[str] = []


def _process_token() -> str:
    if not _TOKEN:
        _TOKEN.append(secrets.token_hex(32))
    return _TOKEN[0]


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None


def require_ray() -> None:
    if not ray_available():
        raise BatchError(INSTALL_HINT)


def _actor_class(spec: TaskSpec, threads: int, skip_hashes: HashSet):
    """A callable class holding one Worker (its closure carries the job, so no constructor arguments go through the object store)."""

    class MedLensBatchWorker:
        # Neither method raises: a failed constructor or call would make Ray retry it and print the worker's traceback
        # to the user's terminal; the runner stops with one line instead (BatchOutput.fatal).
        def __init__(self) -> None:
            from engine.batch.worker import Worker

            self.worker, self.fatal = None, ""
            try:
                self.worker = Worker(spec, threads=threads, skip_hashes=skip_hashes)
            except Exception as exc:
                self.fatal = _message(exc)

        def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
            outputs = []
            for item in batch["batch"]:
                try:
                    if self.worker is None:
                        raise RuntimeError(self.fatal)
                    outputs.append(self.worker.process(pickle.loads(item)))
                except Exception as exc:
                    outputs.append(BatchOutput([], [], fatal=self.fatal or _message(exc)))
            return {"out": [pickle.dumps(o) for o in outputs]}

    return MedLensBatchWorker


class RayEngine:
    name = "ray"

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        gpus_per_worker: float | None = None,
        temp_dir: str | None = None,
        threads: int | None = None,
    ):
        if workers is not None and workers < 1:
            raise BatchError(f"--workers must be at least 1 (got {workers})")
        if threads is not None and threads < 1:
            raise BatchError(f"--threads must be at least 1 (got {threads})")
        self.requested, self.address, self.gpus_per_worker, self.requested_threads = workers, address, gpus_per_worker, threads
        self.workers = workers or 0
        self.cpus_per_worker = self.gpus = 0.0
        self.threads = 1
        self.temp_dir = temp_dir  # a local Ray's session folder (kept); None: a private one under $TMPDIR, removed after
        self._tmp: str | None = None
        self._saved_env: dict[str, str | None] = {}
        self._saved_cluster_switch: bool | None = None
        self._started = False
        self._starting: threading.Thread | None = None  # the thread of start_in_background, alive until close()
        self._ready, self._release = threading.Event(), threading.Event()
        self._start_error: BaseException | None = None

    # ----------------------------------------------------------------- the cluster
    def start_in_background(self) -> None:
        """Start (or join) Ray on a thread while the caller plans the job: Ray's start (~3 s locally) overlaps the header scan.

        The thread stays alive until close(): Ray starts its local services with PR_SET_PDEATHSIG, which Linux
        fires when the *thread* that started them ends, and the driver then dies with them (measured: the plasma
        store went and the CLI exited with status 1)."""
        if self._started or self._starting is not None:
            return
        self._ready.clear()
        self._release.clear()

        def starting() -> None:
            try:
                self._start_now()
            except BaseException as exc:  # re-raised by start() on the caller's thread
                self._start_error = exc
            finally:
                self._ready.set()
            self._release.wait()

        self._starting = threading.Thread(target=starting, name="medlens-ray-start", daemon=True)
        self._starting.start()

    def start(self) -> None:
        if self._starting is not None:
            self._ready.wait()
            if self._start_error is not None:
                error, self._start_error = self._start_error, None
                raise error
        self._start_now()

    def _start_now(self) -> None:
        if self._started:
            return
        import ray

        try:
            if self.address:
                ray.init(
                    address=self.address,
                    include_dashboard=False,
                    logging_level=logging.ERROR,
                    log_to_driver=False,
                    runtime_env={"env_vars": _medlens_env()},
                )
            else:
                self._start_local(ray)
        except Exception as exc:
            self.close()
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise BatchError(f"could not start or join {where} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None
        self._started = True
        self._size(ray)
        import ray.data  # noqa: F401  (a second of imports, done here so that a background start covers it too)

    def _start_local(self, ray) -> None:
        # short: Ray's socket paths under it must stay within 107 characters
        folder = self.temp_dir or tempfile.mkdtemp(prefix="medlens-ray-")
        self._tmp = None if self.temp_dir else folder
        os.makedirs(folder, exist_ok=True)
        settings_env = dict(_LOCAL_ENV)
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            # no token configured: ours, in the session folder (Ray would write one to ~/.ray). One value per
            # process: Ray's C++ side keeps the first token it reads, so a second local Ray must get the same one.
            token = os.path.join(folder, "auth_token")
            with open(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
                fh.write(_process_token())
            settings_env["RAY_AUTH_TOKEN_PATH"] = token
        for key, value in settings_env.items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None:  # Ray read its switches at import already: apply the loopback one now
            self._saved_cluster_switch = constants.ENABLE_RAY_CLUSTER
            constants.ENABLE_RAY_CLUSTER = False
        # Ray turns token authentication on for a new local cluster and says so; the token is ours, in _tmp
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(
            address="local",
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=folder,
            object_store_memory=OBJECT_STORE_BYTES,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )

    def _size(self, ray) -> None:
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 1.0)), float(resources.get("GPU", 0.0))
        node_cpus = max([float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")] or [cpus])
        if gpus >= 1 and self.gpus_per_worker != 0:
            self.gpus = float(self.gpus_per_worker or 1.0)
            self.workers = self.requested or max(1, int(gpus // self.gpus))
        else:
            self.gpus = 0.0
            self.workers = self.requested or max(1, int(cpus // 2))  # two torch threads per actor by default
        share = min((cpus - RESERVED_CPUS) / self.workers, node_cpus - RESERVED_CPUS)
        self.cpus_per_worker = round(max(0.05, share), 3)
        self.threads = self.requested_threads or max(1, round(self.cpus_per_worker))

    def describe(self) -> str:
        where = f"Ray cluster at {self.address}" if self.address else "a local Ray (loopback only)"
        if not self._started:
            return f"ray, {where}, {self.requested or 'one actor per 2 CPUs (or per GPU)'} worker(s)"
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"ray, {where}, {self.workers} actor(s) of {self.cpus_per_worker:g} CPU{gpu} with {self.threads} torch thread(s) each"

    # ----------------------------------------------------------------- the job
    def run(self, spec: TaskSpec, batches: Sequence[list[Unit]], skip_hashes: HashSet) -> Iterator[BatchOutput]:
        if not batches:
            return
        self.start()
        import ray
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the runner shows one bar for the whole run
        context.print_on_execution_start = False
        context.enable_auto_log_stats = False
        context.max_errored_blocks = -1  # a batch given up after its retries must not stop the others
        # start every actor before the first batch: work spreads over all of them (the first one up would otherwise take
        # a short job alone), and a pool the cluster cannot place fails with a message instead of waiting forever
        context.wait_for_min_actors_s = ACTOR_START_S
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.")  # e.g. "fewer inputs than actors"
        warnings.filterwarnings("ignore", message=r".*`ray_remote_args` is deprecated")
        dataset = ray.data.from_items([{"batch": pickle.dumps(list(b))} for b in batches], override_num_blocks=len(batches))
        arguments = dict(
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus or None,
        )
        worker_class = _actor_class(spec, self.threads, skip_hashes)
        try:  # bounded retries go through Ray's generic remote arguments, deprecated in 2.60 but with no named successor
            mapped = dataset.map_batches(worker_class, **arguments, max_restarts=-1, max_task_retries=MAX_TASK_RETRIES)
        except TypeError:  # a Ray without them: its defaults (actors restart, batches retried without limit)
            mapped = dataset.map_batches(worker_class, **arguments)
        try:
            for row in mapped.iter_rows():
                yield pickle.loads(row["out"])
        except BatchError:
            raise
        except Exception as exc:
            raise BatchError(f"the Ray job failed: {_root_cause(exc)}") from None

    def close(self) -> None:
        if self._starting is not None:  # a start still under way: let it finish before shutting Ray down
            self._ready.wait()
        try:
            import ray

            if self._started or ray.is_initialized():
                ray.shutdown()
        except Exception:
            pass
        if self._starting is not None:
            self._release.set()
            self._starting.join()
            self._starting = None
        self._started = False
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None and self._saved_cluster_switch is not None:
            constants.ENABLE_RAY_CLUSTER = self._saved_cluster_switch
            self._saved_cluster_switch = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _message(exc: BaseException) -> str:
    from engine.errors import MedLensError

    text = " ".join(str(exc).split())[:400]
    return text if isinstance(exc, MedLensError) else f"{type(exc).__name__}: {text}"


def _medlens_env() -> dict[str, str]:
    """MEDLENS_* settings set here, for workers on other machines (the same model, prompts and UID salt everywhere)."""
    return {s.env: s.raw() for s in settings.SETTINGS if s.raw()}


def _root_cause(exc: BaseException) -> str:
    """The last 'SomethingError: message' line of a Ray error (its text holds the worker's traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return " ".join(line.split())[:400]
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
