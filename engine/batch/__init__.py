"""Archive-scale runs: `medlens batch label|ask|index SOURCE... --out DIR`, in-process by default, on Ray Data when asked.

    from engine.batch import RunOptions, TaskSpec, make_engine, run_batch
    spec = TaskSpec("label", "medlens-clip", {"labels": ["pneumonia", "normal"]})
    summary = run_batch(spec, ["/archive/2024"], make_engine("local"), RunOptions(out="/results/cxr-2024"))

Modules, in the order data flows:
- units: what one row is about (a DICOM series, or one file), and how it is
  recognised without reading it (fingerprint);
- sources: SOURCE arguments -> units (folders, zips, listings; new kinds
  such as a PACS query register a prefix);
- reading: a unit's bytes -> engine.io Sources + content hash (worker side);
- tasks: label / ask / index on prepared scans, images batched per call;
- worker: one model per process, a batch of units -> rows;
- engines: local (in-process or a process pool) and ray (ray_engine);
- output: job, atomic shards, what is done, summary; library_writer: the
  one library writer for index;
- runner: plan, skip what is done, run, write exactly once;
- cli: the subcommand, registered by engine.cli.

Nothing here imports gradio, app or training; Ray is imported only by
ray_engine, only for --engine ray.
"""

from engine.batch.engines import ENGINES, Engine, LocalEngine, make_engine
from engine.batch.errors import BatchError
from engine.batch.output import all_rows
from engine.batch.runner import RunOptions, run_batch
from engine.batch.sources import open_source, plan_units, register_source
from engine.batch.tasks import TaskSpec

__all__ = [
    "ENGINES",
    "BatchError",
    "Engine",
    "LocalEngine",
    "RunOptions",
    "TaskSpec",
    "all_rows",
    "make_engine",
    "open_source",
    "plan_units",
    "register_source",
    "run_batch",
]
