"""One worker: holds one model, turns a batch of units into rows. The same code runs in-process, in a process pool and in a Ray actor.

Design decisions
- A worker is built once per process (the model loads in its constructor)
  and then called once per batch; nothing it returns refers to a scan, so
  a batch's output is small (rows, and for index the library rows with
  their embeddings and thumbnails).
- Time is split per phase, as the benchmark reports it: read (bytes in,
  hashed and decoded into scans), preprocess (the model images: slices,
  windowing, letterboxing; for index also the thumbnail and de-identified
  summary), model (the encoder, the model's own resize and normalisation
  included, and scoring). Writing is timed by the runner.
- A bad unit gives one error row and the batch goes on. A unit whose
  content hash is in `skip_hashes` (done already under another name or
  place) is not decoded: it gets a 'duplicate' row (no result; the row with
  the same "unit" hash has it).
- Rows hold no timing, worker or machine fields: the same units give the
  same rows on any engine (tests compare them).
"""

from __future__ import annotations

import os
import socket
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from engine.batch.reading import read_unit
from engine.batch.tasks import ScanWork, TaskSpec, make_task
from engine.batch.units import Unit
from engine.errors import MedLensError

PHASES = ("read", "preprocess", "model", "write")
STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_DUPLICATE = "duplicate"  # same bytes as a unit with a row already (find it by the same "unit" hash)


@dataclass
class BatchOutput:
    rows: list[dict[str, Any]]
    payloads: list[list[Any]]  # per row: what the library writer stores (index), else []
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds spent on this batch
    model_id: str = ""
    worker: str = ""  # host:pid, for the summary's count of workers
    node: str = ""  # Ray node id (or the host name)
    fatal: str = ""  # set when the worker cannot work at all (its model did not load): the run stops with this message
    inference: str = ""  # the worker's inference path (engine.models.fastpath: fp32, bf16, int8, onnx-int8, cuda-fp32)
    n_images: int = 0


class HashSet:
    """Content hashes (hex SHA-256) as one sorted array of 32-byte digests: 32 MB for a million, shipped to every worker."""

    def __init__(self, hashes: Iterable[str] = ()):
        import numpy as np

        digests = sorted(bytes.fromhex(h) for h in hashes)
        self._digests = np.array(digests, dtype="S32") if digests else np.zeros(0, dtype="S32")

    def __contains__(self, content_hash: object) -> bool:
        import numpy as np

        if not isinstance(content_hash, str) or not len(self._digests):
            return False
        key = np.array(bytes.fromhex(content_hash), dtype="S32")
        at = int(np.searchsorted(self._digests, key))
        return at < len(self._digests) and self._digests[at] == key

    def __len__(self) -> int:
        return len(self._digests)


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


def one_line(text: str, limit: int = 500) -> str:
    return " ".join(str(text).split())[:limit]


def failure_reason(message: str, source: str = "") -> str:
    """The part of an error message that is the same for every file with that problem (the summary groups by it)."""
    text = one_line(message)
    for name in (source, os.path.basename(source)):
        if name and text.startswith(name + ": "):
            text = text[len(name) + 2 :]
    if ": " in text[:200] and not text.startswith(("no scan", "not ", "cannot", "named like")):
        head, rest = text.split(": ", 1)
        if "/" in head or "." in head:  # "<file name>: reason" from a member of the unit
            text = rest
    for stop in (" (", "; "):
        if stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()[:100] or "error"


def base_row(unit: Unit, spec_key: str, task: str) -> dict[str, Any]:
    return {
        "unit": None,
        "fingerprint": unit.fingerprint,
        "source": unit.source,
        "kind": unit.kind,
        "n_files": len(unit.members),
        "task": task,
        "job": spec_key,
        "model": None,
        "status": STATUS_ERROR,
        "result": None,
        "error": None,
        "warnings": [],
    }


def error_row(
    unit: Unit, spec_key: str, task: str, message: str, content_hash: str | None = None, model_id: str | None = None
) -> dict[str, Any]:
    row = base_row(unit, spec_key, task)
    row.update(unit=content_hash, model=model_id, error={"reason": failure_reason(message, unit.source), "message": one_line(message)})
    return row


class Worker:
    def __init__(self, spec: TaskSpec, *, threads: int | None = None, skip_hashes: HashSet | None = None, device: str = "auto"):
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.spec, self.key, self.skip_hashes, self.device = spec, spec.key(), skip_hashes or HashSet(), device
        self.task = make_task(spec, device)
        self.task.load()
        self.model_id = self.task.model_id
        self.inference = getattr(getattr(self.task.model, "path", None), "name", "")
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.node = _node_id()

    def process(self, units: list[Unit]) -> BatchOutput:
        timer = Timer()
        out = BatchOutput([], [], model_id=self.model_id, worker=self.name, node=self.node, inference=self.inference)
        pending: list[tuple[dict[str, Any], list[ScanWork | str]]] = []  # row, then per scan: work or an error message
        for unit in units:
            self._prepare_unit(unit, timer, pending)
        images = [im for _row, works in pending for w in works if isinstance(w, ScanWork) for im in w.images]
        out.n_images = len(images)
        with timer("model"):
            embeddings = self.task.encode(images) if images else None
            at = 0
            for row, works in pending:
                at = self._finish_unit(row, works, embeddings, at, out)
        out.timings = dict(timer.seconds)
        return out

    def _prepare_unit(self, unit: Unit, timer: Timer, pending: list) -> None:
        if unit.problem is not None:
            pending.append((error_row(unit, self.key, self.spec.task, unit.problem), []))
            return
        row = base_row(unit, self.key, self.spec.task)
        row["model"] = self.model_id
        from engine.io import load_sources

        with timer("read"):
            try:
                read = read_unit(unit)
                row["unit"] = read.content_hash
                if read.content_hash in self.skip_hashes:
                    row["status"] = STATUS_DUPLICATE
                    pending.append((row, []))
                    return
                loaded = load_sources(read.sources)
                del read
            except MedLensError as exc:
                pending.append((error_row(unit, self.key, self.spec.task, str(exc), row["unit"], self.model_id), []))
                return
            except Exception as exc:  # the last line of defence: one bad unit never stops the batch
                message = f"could not be read ({type(exc).__name__}: {one_line(str(exc), 160)})"
                pending.append((error_row(unit, self.key, self.spec.task, message, row["unit"], self.model_id), []))
                return
        row["warnings"] = [one_line(m) for m in loaded.messages()]
        works: list[ScanWork | str] = []
        for scan in loaded.scans:
            with timer(self.task.prepare_phase):
                try:
                    works.append(self.task.prepare(scan, unit.source, timer))
                except MedLensError as exc:
                    works.append(one_line(str(exc)))
                except Exception as exc:
                    works.append(f"could not be processed ({type(exc).__name__}: {one_line(str(exc), 160)})")
        pending.append((row, works))

    def _finish_unit(self, row: dict[str, Any], works: list, embeddings, at: int, out: BatchOutput) -> int:
        if not works:  # an error or duplicate row made while reading
            out.rows.append(row)
            out.payloads.append([])
            return at
        scans, payloads = [], []
        for work in works:
            if isinstance(work, str):
                scans.append({"error": work})
                continue
            n = len(work.images)
            try:
                result, payload = self.task.finish(work, embeddings[at : at + n] if n else None)
            except MedLensError as exc:
                result, payload = {**work.info, "error": one_line(str(exc))}, None
            at += n
            scans.append(result)
            if payload is not None:
                payloads.append(payload)
        good = [s for s in scans if "error" not in s]
        if good:
            row.update(status=STATUS_OK, result={"scans": scans})
        else:
            message = scans[0]["error"]
            row.update(status=STATUS_ERROR, error={"reason": failure_reason(message, row["source"]), "message": message})
        out.rows.append(row)
        out.payloads.append(payloads)
        return at


def _node_id() -> str:
    import sys

    try:
        ray = sys.modules.get("ray")  # never imported here just to ask (it takes a second)
        if ray is not None and ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return socket.gethostname()
