"""The output folder of a batch run: the job, sharded rows written atomically, the summary, what is done.

Layout of --out DIR:
    job.json                      the job (task, model source, options, key) and the model id@revision that ran it
    shards/part-<run>-<n>.jsonl   rows (or .parquet), one per unit; a shard appears whole or not at all
    summary.json                  counts, failures by reason, throughput and time per phase (rewritten as the run goes)

Design decisions
- Exactly once: a row becomes visible only when its shard is renamed into
  place (written to a hidden temporary file, flushed and fsync'ed, then
  os.replace, then the folder fsync'ed). A run killed at any moment leaves
  whole shards and at most a temporary file, which the next run deletes.
  The next run reads every shard, so what is there is done and what is not
  is redone; each unit reaches exactly one shard because one process (the
  runner, the one writer) writes them all and drops any row whose unit it
  has seen.
- One folder holds one job: job.json is written by the first run and a
  rerun with another task, model or arguments is refused with what
  differs, rather than mixing rows that mean different things. Each row
  also carries the job key, so shards copied elsewhere still say what they
  are.
- A lock file (flock, released by the kernel when a process dies, even by
  SIGKILL) keeps two runs from writing into one folder at once.
- Parquet (when pyarrow is installed) stores the same rows with the nested
  parts (result, error, warnings) as JSON text columns, so both formats
  hold the same information and read back the same way.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from engine.batch.errors import BatchError
from engine.batch.tasks import TaskSpec

FORMATS = ("jsonl", "parquet")
SHARDS = "shards"
_NESTED = ("result", "error", "warnings")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds `data` whole, or is untouched: temp file in the same folder, fsync, rename, fsync the folder."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pyarrow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


# --------------------------------------------------------------------------- rows <-> bytes
def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows).encode("utf-8")


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [{k: (json.dumps(v, ensure_ascii=False) if k in _NESTED and v is not None else v) for k, v in row.items()} for row in rows]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(flat), buf)
    return buf.getvalue()


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of one shard (either format), nested parts decoded."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [{k: (json.loads(v) if k in _NESTED and isinstance(v, str) else v) for k, v in row.items()} for row in rows]
    out = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                raise BatchError(f"{path}: line {number} is damaged; move this shard away and rerun (its units are redone)") from None
    return out


def shard_paths(out: Path) -> list[Path]:
    folder = out / SHARDS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("part-") and p.suffix in (".jsonl", ".parquet"))


def all_rows(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row in an output folder (for tests, and for tools reading the results)."""
    return [row for path in shard_paths(Path(out)) for row in read_rows(path)]


# --------------------------------------------------------------------------- what is done
@dataclass
class DoneIndex:
    fingerprints: dict[str, str | None] = field(default_factory=dict)  # fingerprint of each unit with a row -> its content hash
    hashes: set[str] = field(default_factory=set)  # content hashes of units with a row
    status: Counter = field(default_factory=Counter)  # "ok" / "error" -> rows
    reasons: Counter = field(default_factory=Counter)  # error reason -> rows
    model_ids: set[str] = field(default_factory=set)

    def add(self, row: dict[str, Any]) -> None:
        self.fingerprints[row["fingerprint"]] = row.get("unit")
        if row.get("unit"):
            self.hashes.add(row["unit"])
        self.status[row.get("status") or "?"] += 1
        if row.get("error"):
            self.reasons[row["error"].get("reason") or "error"] += 1
        if row.get("model"):
            self.model_ids.add(row["model"])

    @property
    def rows(self) -> int:
        return sum(self.status.values())


# --------------------------------------------------------------------------- the folder
class OutputDir:
    """Opened for one run: locked, job checked, stale temporary files removed."""

    def __init__(self, path: str | os.PathLike, spec: TaskSpec, fmt: str = "jsonl", *, dry_run: bool = False):
        if fmt not in FORMATS:
            raise BatchError(f"unknown output format '{fmt}' (choose {' or '.join(FORMATS)})")
        if fmt == "parquet" and not pyarrow_available():
            raise BatchError('--format parquet needs pyarrow: pip install pyarrow (or pip install -e ".[scale]"), or use --format jsonl')
        self.path = Path(os.path.abspath(os.path.expanduser(str(path))))
        self.spec, self.fmt, self.dry_run = spec, fmt, dry_run
        self._lock_fh = None
        if self.path.exists() and not self.path.is_dir():
            raise BatchError(f"--out {self.path} is a file; give a folder (created if missing)")
        self.job = self._read_job()
        if self.job is not None and self.job.get("key") != spec.key():
            raise BatchError(self._mismatch(self.job))
        if not dry_run:
            self._open()

    def _open(self) -> None:
        try:
            (self.path / SHARDS).mkdir(parents=True, exist_ok=True)
            self._lock_fh = open(self.path / ".lock", "a+")
        except OSError as exc:
            raise BatchError(f"cannot write to --out {self.path} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BatchError(f"another medlens batch is writing to {self.path}; wait for it, or give another --out") from None
        for stale in list((self.path / SHARDS).glob(".*.tmp")) + list(self.path.glob(".*.tmp")):
            stale.unlink(missing_ok=True)  # a killed run's unfinished shard: its units have no row and are redone
        if self.job is None:
            self.job = {**self.spec.to_dict(), "model_id": None, "format": self.fmt, "created": now()}
            self.save_job()

    def close(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def _read_job(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / "job.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise BatchError(f"{self.path / 'job.json'} cannot be read ({exc}); give another --out") from None

    def _mismatch(self, job: dict[str, Any]) -> str:
        mine = self.spec.to_dict()
        diffs = [f"{k}: {job.get(k)!r} there, {mine[k]!r} now" for k in ("task", "model", "options") if job.get(k) != mine[k]]
        return (
            f"--out {self.path} holds the results of another job ({'; '.join(diffs) or 'another row format'}); "
            "give another --out, or the same task, model and arguments to resume it"
        )

    def save_job(self) -> None:
        write_atomic(self.path / "job.json", (json.dumps(self.job, indent=1) + "\n").encode())

    def record_model(self, model_id: str) -> None:
        """The model id@revision that ran; a rerun whose model changed under the same source is refused."""
        if self.job.get("model_id") in (None, model_id):
            if self.job.get("model_id") is None:
                self.job["model_id"] = model_id
                self.save_job()
            return
        raise BatchError(
            f"the model '{self.spec.model}' is now {model_id}, but the rows in {self.path} were made by {self.job['model_id']}; "
            "give another --out for the new model"
        )

    def load_done(self) -> DoneIndex:
        done = DoneIndex()
        key = self.spec.key()
        for path in shard_paths(self.path):
            for row in read_rows(path):
                if row.get("job") == key:
                    done.add(row)
        return done

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.path / "summary.json", (json.dumps(summary, indent=1, ensure_ascii=False) + "\n").encode())


class ShardWriter:
    """Buffers rows; `flush()` writes them as one new shard, atomically."""

    def __init__(self, out: OutputDir, run_id: str):
        self.out, self.run_id, self.seq = out, run_id, 0
        self.buffer: list[dict[str, Any]] = []
        self.shards = 0

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        self.buffer.extend(rows)

    def flush(self) -> None:
        if not self.buffer:
            return
        self.seq += 1
        suffix = ".parquet" if self.out.fmt == "parquet" else ".jsonl"
        data = parquet_bytes(self.buffer) if self.out.fmt == "parquet" else jsonl_bytes(self.buffer)
        write_atomic(self.out.path / SHARDS / f"part-{self.run_id}-{self.seq:05d}{suffix}", data)
        self.shards += 1
        self.buffer = []
