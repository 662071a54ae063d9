"""Engines behind one interface: where the workers run. `local` (default) in this process or a small process pool; `ray` on Ray Data.

    engine = make_engine("local", workers=1)
    for output in engine.run(spec, batches, skip_hashes): ...   # BatchOutputs, in any order
    engine.close()

Design decisions
- Every engine runs the same `Worker` (engine.batch.worker) on the same
  batches, so rows do not depend on the engine; engines only differ in
  where workers live and how batches reach them. Rows are bit-identical
  when workers also use the same number of torch threads (`--threads`):
  the encoder's float sums are ordered by thread, so probabilities made
  with 1 and with 2 threads can differ in the sixth decimal (measured).
- local, 1 worker (the default): the model loads in this process, torch
  uses the physical cores. Measured on 2 cores (bench/results/batch.md),
  it indexed 1,000 real images at 60/s, a pool of 2 processes at 48/s
  after its 6 s start (0.80x: with one thread each the fast-path probe
  keeps fp32, and the encoder dominates), so in-process is the default;
  `--workers N` starts N spawned processes with cores/N torch threads
  each, which can win where single-threaded reading and decoding dominate
  (CT series: docs/scaling.md).
  A pool worker that dies breaks the pool: the run stops, and a rerun
  resumes (only Ray retries lost workers).
- ray: engine.batch.ray_engine, imported only when asked for, so Ray stays
  an optional extra.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Iterator, Protocol, Sequence

from engine.batch.errors import BatchError
from engine.batch.tasks import TaskSpec
from engine.batch.units import Unit
from engine.batch.worker import BatchOutput, HashSet, Worker

ENGINES = ("local", "ray")


class Engine(Protocol):
    name: str

    def describe(self) -> str: ...

    def run(self, spec: TaskSpec, batches: Sequence[list[Unit]], skip_hashes: HashSet) -> Iterator[BatchOutput]: ...

    def close(self) -> None: ...


def _cores() -> int:
    from engine.models.cpu import cpu_profile

    return max(1, cpu_profile().cores)


_POOL_WORKER: Worker | None = None


def _pool_init(spec: TaskSpec, threads: int, skip_hashes: HashSet) -> None:
    global _POOL_WORKER
    _POOL_WORKER = Worker(spec, threads=threads, skip_hashes=skip_hashes)


def _pool_process(units: list[Unit]) -> BatchOutput:
    assert _POOL_WORKER is not None
    return _POOL_WORKER.process(units)


class LocalEngine:
    name = "local"

    def __init__(self, workers: int = 1, threads: int | None = None):
        if workers < 1:
            raise BatchError(f"--workers must be at least 1 (got {workers})")
        if threads is not None and threads < 1:
            raise BatchError(f"--threads must be at least 1 (got {threads})")
        self.workers = workers
        self.threads = threads or (max(1, _cores() // workers) if workers > 1 else None)

    def describe(self) -> str:
        if self.workers == 1:
            return "local, in this process" + (f" with {self.threads} torch thread(s)" if self.threads else "")
        return f"local, {self.workers} worker processes with {self.threads} torch thread(s) each"

    def run(self, spec: TaskSpec, batches: Sequence[list[Unit]], skip_hashes: HashSet) -> Iterator[BatchOutput]:
        if not batches:
            return
        if self.workers == 1:
            worker = Worker(spec, threads=self.threads, skip_hashes=skip_hashes)
            for batch in batches:
                yield worker.process(batch)
            return
        yield from self._pool(spec, batches, skip_hashes)

    def _pool(self, spec: TaskSpec, batches: Sequence[list[Unit]], skip_hashes: HashSet) -> Iterator[BatchOutput]:
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        with ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_pool_init, initargs=(spec, self.threads, skip_hashes)
        ) as pool:
            queue = iter(batches)
            running = set()
            for batch in queue:
                running.add(pool.submit(_pool_process, batch))
                if len(running) >= 2 * self.workers:
                    break
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    try:
                        output = future.result()
                    except BrokenProcessPool:
                        raise BatchError(
                            "a worker process died (killed, or out of memory); run the same command again: it resumes"
                        ) from None
                    yield output
                    following = next(queue, None)
                    if following is not None:
                        running.add(pool.submit(_pool_process, following))

    def close(self) -> None:
        pass


def make_engine(
    name: str,
    *,
    workers: int | None = None,
    threads: int | None = None,
    ray_address: str | None = None,
    gpus_per_worker: float | None = None,
) -> Engine:
    if name == "local":
        if ray_address:
            raise BatchError("--ray-address is for --engine ray")
        return LocalEngine(workers or 1, threads)
    if name == "ray":
        from engine.batch.ray_engine import RayEngine, require_ray

        require_ray()
        return RayEngine(workers=workers, threads=threads, address=ray_address, gpus_per_worker=gpus_per_worker)
    raise BatchError(f"unknown engine '{name}' (choose {' or '.join(ENGINES)})")
