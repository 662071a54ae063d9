"""The batch runner: plan the units, skip what is done, run the rest on an engine, write rows exactly once.

Design decisions
- This process is the one writer: engines hand back batch outputs and the
  runner alone writes shards (engine.batch.output) and, for index, the
  library (engine.batch.library_writer), so exactly-once does not depend
  on how an engine retries.
- Resuming, in two steps. (1) Before running: a unit whose fingerprint
  (its files' names, sizes and times; engine.batch.units) already has a row
  in this job is not even read. (2) While running: a unit whose content
  hash already has a row (a copy under another name, a moved or renamed
  archive) gets a 'duplicate' row without a result, pointing by its hash
  at the row that has one; workers are told the hashes done before, so
  they skip decoding such units. So every unit has exactly one row, and
  every content hash exactly one result (ok or error) per job, which is
  (model source, model revision, arguments): job.json. A row for a unit
  that already has one (an engine running a batch twice) is dropped.
- Rows reach a shard every `shard_rows` rows or `shard_seconds` seconds,
  whichever comes first, and at the end; Ctrl-C writes what is done before
  stopping. A kill loses at most the rows not yet in a shard; they are
  redone by the next run.
- The summary (summary.json) is rewritten at each shard, so a long run can
  be watched: units planned, done before, done now, errors by reason,
  missing (planned, no row: a run stopped early or a batch given up),
  throughput and time per unit per phase.
- --limit takes the first N units still to do (in source order);
  --dry-run plans, counts and prints, and loads no model.
"""

from __future__ import annotations

import datetime
import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from engine.batch.engines import Engine
from engine.batch.errors import BatchError
from engine.batch.output import DoneIndex, OutputDir, ShardWriter, now
from engine.batch.sources import plan_units
from engine.batch.tasks import TaskSpec
from engine.batch.units import KIND_SERIES, Unit
from engine.batch.worker import PHASES, STATUS_DUPLICATE, STATUS_ERROR, STATUS_OK, BatchOutput, HashSet

DEFAULT_BATCH_UNITS = 16  # units per worker call: 16 2D images make one encoder batch of the size the model batches by
DEFAULT_SHARD_ROWS = 500
DEFAULT_SHARD_SECONDS = 60.0


@dataclass
class RunOptions:
    out: str
    fmt: str = "jsonl"
    batch_units: int = DEFAULT_BATCH_UNITS
    limit: int | None = None
    dry_run: bool = False
    shard_rows: int = DEFAULT_SHARD_ROWS
    shard_seconds: float = DEFAULT_SHARD_SECONDS
    library: str | None = None  # index: the library file (None: $MEDLENS_LIBRARY or the default)
    progress: bool = True


@dataclass
class Plan:
    units: list[Unit]  # every unit under the SOURCEs
    todo: list[Unit]  # not done yet (after --limit)
    done_before: int  # units whose fingerprint has a row already
    plan_s: float
    counts: dict[str, int] = field(default_factory=dict)

    def batches(self, size: int) -> list[list[Unit]]:
        return [self.todo[i : i + size] for i in range(0, len(self.todo), size)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "units": len(self.units),
            **self.counts,
            "done_before": self.done_before,
            "to_do": len(self.todo),
            "plan_s": round(self.plan_s, 2),
        }


@dataclass
class Tally:
    """What happened in this run."""

    rows: int = 0
    status: Counter = field(default_factory=Counter)
    repeats: int = 0  # rows an engine delivered twice (dropped)
    phase_s: Counter = field(default_factory=Counter)
    images: int = 0
    workers: set[str] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)
    inference: set[str] = field(default_factory=set)
    model_id: str = ""
    started: float = field(default_factory=time.monotonic)
    first_output: float | None = None  # when the first batch came back (workers started, model loaded)
    first_rows: int = 0


def _progress_bar(total: int | None, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, leave=False, smoothing=0.05, dynamic_ncols=True)


def make_plan(sources: Sequence[str], out: OutputDir, options: RunOptions) -> tuple[Plan, DoneIndex]:
    started = time.monotonic()
    bar = _progress_bar(None, "scanning", "file", options.progress)
    try:
        units = plan_units(sources, progress=lambda n: bar.update(n - bar.n))
    finally:
        bar.close()
    done = out.load_done()
    todo = [u for u in units if u.fingerprint not in done.fingerprints]
    done_before = len(units) - len(todo)
    if options.limit is not None:
        todo = todo[: max(0, options.limit)]
    counts = {
        "series": sum(u.kind == KIND_SERIES for u in units),
        "single_files": sum(u.kind != KIND_SERIES and u.problem is None for u in units),
        "refused": sum(u.problem is not None for u in units),
        "files": sum(len(u.members) for u in units),
    }
    return Plan(units, todo, done_before, time.monotonic() - started, counts), done


def _skip_hashes(done: DoneIndex) -> HashSet:
    """Content hashes with a row: a unit still to do with one of them (a copy, a moved file) is skipped once read."""
    return HashSet(done.hashes)


class _Sink:
    """Accepts batch outputs, drops repeats, writes shards (and the library) on the flush policy."""

    def __init__(
        self,
        spec: TaskSpec,
        out: OutputDir,
        done: DoneIndex,
        tally: Tally,
        options: RunOptions,
        run_id: str,
        library,
        on_flush: Callable[[], None],
    ):
        self.spec, self.out, self.done, self.tally, self.options, self.on_flush = spec, out, done, tally, options, on_flush
        self.writer = ShardWriter(out, run_id)
        self.library = library
        self.pending_library: list[tuple[dict, list]] = []
        self.last_flush = time.monotonic()

    def accept(self, output: BatchOutput) -> int:
        """Take one batch's rows; returns how many units it accounts for."""
        tally = self.tally
        if output.fatal:
            raise BatchError(f"a worker could not work: {output.fatal}")
        if tally.first_output is None:
            tally.first_output, tally.first_rows = time.monotonic(), len(output.rows)
        if output.model_id and output.model_id != tally.model_id:
            self.out.record_model(output.model_id)  # refuses a model that changed under the same source
            tally.model_id = output.model_id
        for row, payload in zip(output.rows, output.payloads):
            if row["fingerprint"] in self.done.fingerprints:  # the same unit twice (an engine's retry): one row only
                tally.repeats += 1
                continue
            if row.get("unit") and row["unit"] in self.done.hashes and row["status"] != STATUS_DUPLICATE:
                row.update(status=STATUS_DUPLICATE, result=None, error=None, warnings=[])  # same bytes as a unit done already
                payload = []
            self.done.add(row)
            tally.rows += 1
            tally.status[row["status"]] += 1
            self.writer.add([row])
            if payload:
                self.pending_library.append((row, payload))
        tally.phase_s.update(output.timings)
        tally.images += output.n_images
        tally.workers.add(output.worker)
        tally.nodes.add(output.node)
        if output.inference:
            tally.inference.add(output.inference)
        if len(self.writer.buffer) >= self.options.shard_rows or time.monotonic() - self.last_flush >= self.options.shard_seconds:
            self.flush()
        return len(output.rows)

    def flush(self) -> None:
        started = time.perf_counter()
        if self.library is not None and self.pending_library:
            self.library.write(self.pending_library)  # commits before the rows become visible (library_writer)
        self.pending_library = []
        wrote = bool(self.writer.buffer)
        self.writer.flush()
        self.tally.phase_s["write"] += time.perf_counter() - started
        self.last_flush = time.monotonic()
        if wrote:
            self.on_flush()


def run_batch(
    spec: TaskSpec,
    sources: Sequence[str],
    engine: Engine,
    options: RunOptions,
    *,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run (or with dry_run, plan) the job; returns the summary (also written to OUT/summary.json)."""
    out = OutputDir(options.out, spec, options.fmt, dry_run=options.dry_run)
    try:
        plan, done = make_plan(sources, out, options)
        if options.dry_run:
            return plan_summary(spec, plan, engine, out)
        return _execute(spec, plan, done, engine, out, options, on_batch)
    finally:
        engine.close()
        out.close()


def _execute(spec, plan: Plan, done: DoneIndex, engine: Engine, out: OutputDir, options: RunOptions, on_batch) -> dict[str, Any]:
    # unique per run (two runs in one second in one process must not share shard names): time, pid, random
    run_id = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}-{os.getpid()}-{secrets.token_hex(3)}"
    tally = Tally()
    library = None
    if spec.task == "index":
        from engine.batch.library_writer import LibraryWriter

        library = LibraryWriter(options.library)
    started_at = now()

    def progress_summary() -> None:
        out.write_summary(summarise(spec, plan, done, tally, engine, out, library, started_at, "running"))

    sink = _Sink(spec, out, done, tally, options, run_id, library, progress_summary)
    state = "interrupted"
    bar = _progress_bar(len(plan.todo), f"batch {spec.task}", "scan", options.progress)
    try:
        accounted = 0
        for output in engine.run(spec, plan.batches(options.batch_units), _skip_hashes(done)):
            n = sink.accept(output)
            accounted += n
            bar.update(n)
            if on_batch is not None:
                on_batch(accounted, len(plan.todo))
        state = "finished"
    finally:
        bar.close()
        try:
            sink.flush()
            summary = summarise(spec, plan, done, tally, engine, out, library, started_at, state)
            out.write_summary(summary)
        finally:
            if library is not None:
                library.close()
    return summary


def plan_summary(spec: TaskSpec, plan: Plan, engine: Engine, out: OutputDir) -> dict[str, Any]:
    return {"dry_run": True, "job": spec.to_dict(), "out": str(out.path), "engine": engine.describe(), "plan": plan.to_dict()}


def summarise(
    spec, plan: Plan, done: DoneIndex, tally: Tally, engine: Engine, out: OutputDir, library, started_at: str, state: str
) -> dict[str, Any]:
    planned = {u.fingerprint for u in plan.units}
    missing = len(planned - done.fingerprints.keys())
    elapsed = time.monotonic() - tally.started
    steady = time.monotonic() - tally.first_output if tally.first_output else 0.0
    handled = tally.rows
    per_unit = {p: round(1000 * tally.phase_s.get(p, 0.0) / handled, 2) if handled else None for p in PHASES}
    return {
        "state": state,  # running / finished / interrupted
        "complete": missing == 0,
        "job": {**spec.to_dict(), "model_id": tally.model_id or out.job.get("model_id")},
        "engine": engine.describe(),
        "out": str(out.path),
        "format": out.fmt,
        **({"library": str(library.path)} if library is not None else {}),
        "plan": plan.to_dict(),
        "run": {
            "started": started_at,
            "updated": now(),
            "rows": tally.rows,
            "ok": tally.status.get(STATUS_OK, 0),
            "errors": tally.status.get(STATUS_ERROR, 0),
            "duplicates": tally.status.get(STATUS_DUPLICATE, 0),
            "repeats_dropped": tally.repeats,
            "wall_s": round(elapsed, 2),
            "units_per_s": round(handled / elapsed, 3) if elapsed > 0 else None,
            "first_batch_s": round(tally.first_output - tally.started, 2)
            if tally.first_output
            else None,  # includes starting workers, loading the model
            "units_per_s_after_first_batch": round((handled - tally.first_rows) / steady, 3)
            if steady > 0 and handled > tally.first_rows
            else None,
            "ms_per_unit": per_unit,  # summed over workers: with N workers in parallel this exceeds wall time / unit
            "images_encoded": tally.images,
            "workers": len(tally.workers),
            "nodes": len(tally.nodes),
            "inference_paths": sorted(tally.inference),
        },
        "totals": {
            "rows": done.rows,
            "ok": done.status.get(STATUS_OK, 0),
            "errors": done.status.get(STATUS_ERROR, 0),
            "duplicates": done.status.get(STATUS_DUPLICATE, 0),
            "missing": missing,
            "failures_by_reason": dict(done.reasons.most_common()),
        },
    }
