"""`medlens batch label|ask|index SOURCE... --out DIR`: archive-scale runs (registered by engine.cli).

Exit status: 0 when the job has rows and nothing planned is missing; 1 when
units are missing after the run (a batch given up, see summary.json; rerun
to retry them); 2 on bad input (nothing found, every unit failed, bad
arguments, --out holding another job); 130 on Ctrl-C (what was done is
kept, and a rerun resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from engine import settings
from engine.batch.errors import BatchError
from engine.batch.output import FORMATS
from engine.batch.runner import DEFAULT_BATCH_UNITS, DEFAULT_SHARD_ROWS, DEFAULT_SHARD_SECONDS, RunOptions, run_batch
from engine.batch.tasks import TaskSpec

EXIT_MISSING = 1
EXIT_BAD_INPUT = 2


def _model_source(task: str, given: str | None) -> str:
    """The model source the job is keyed by: --model, else the setting, else the shipped default."""
    if task == "ask":
        from engine.ask.model import DEFAULT_ASK_MODEL

        return (given or settings.ASK_MODEL.get() or DEFAULT_ASK_MODEL).strip()
    from engine.models import DEFAULT_MODEL

    return (given or settings.MODEL.get() or DEFAULT_MODEL).strip()


def _check_model(task: str, source: str) -> None:
    """Fail before planning when the model obviously cannot load (a missing folder, an unknown shipped name)."""
    import os

    from engine.models.source import LOCAL_DIR, SHIPPED, parse_source

    parsed = parse_source(source)
    if parsed.kind == LOCAL_DIR and not os.path.isdir(parsed.identifier):
        raise BatchError(f"model folder {parsed.identifier} does not exist (--model local-dir:/path)")
    if parsed.kind == SHIPPED:
        if task == "ask":
            from engine.ask.model import ask_models

            known = ask_models()
        else:
            from engine.models.registry import KNOWN_HUB, shipped_models

            known = {**shipped_models(), **KNOWN_HUB}
        if parsed.identifier not in known:
            raise BatchError(f"unknown model '{parsed.identifier}' (see `medlens models`; or local-dir:/path)")


def _task_options(args) -> dict[str, Any]:
    if args.task == "label":
        from engine.zeroshot import SOFTMAX, clean_labels

        labels = clean_labels(args.labels) if args.labels is not None else None
        if labels is not None and args.mode == SOFTMAX and len(labels) < 2:
            raise BatchError("a softmax over one label always gives 1: give at least two labels, or --mode present-absent")
        if args.slices < 1:
            raise BatchError(f"--slices must be at least 1 (got {args.slices})")
        from engine import settings

        return {
            "labels": labels,
            "modality": args.modality,
            "mode": args.mode,
            "aggregate": args.aggregate,
            "planes": list(args.planes),
            "slices": args.slices,
            "per_slice": args.per_slice,
            "fov_check": args.fov_check or settings.FOV_CHECK.get(),
            "volume_model": settings.ASK_MODEL.get(),
        }
    if args.task == "ask":
        from engine.ask.questions import validate_question

        return {"questions": [validate_question(q) for q in args.questions]}
    from engine.library import library_path

    return {"library": str(library_path(args.library).expanduser().resolve())}


def cmd_batch(args) -> int:
    spec = TaskSpec(args.task, _model_source(args.task, args.model), _task_options(args))
    if args.batch_size < 1 or args.shard_rows < 1:
        raise BatchError("--batch-size and --shard-rows must be at least 1")
    if not args.dry_run:
        _check_model(args.task, spec.model)
    from engine.batch.engines import make_engine

    engine = make_engine(
        args.engine, workers=args.workers, threads=args.threads, ray_address=args.ray_address, gpus_per_worker=args.gpus_per_worker
    )
    if not args.dry_run and hasattr(engine, "start_in_background"):
        engine.start_in_background()  # Ray starts while the sources are scanned
    options = RunOptions(
        out=args.out,
        fmt=args.format,
        batch_units=args.batch_size,
        limit=args.limit,
        dry_run=args.dry_run,
        shard_rows=args.shard_rows,
        shard_seconds=args.shard_seconds,
        library=spec.options.get("library"),
        progress=not args.quiet,
    )
    summary = _run_audited(spec, args, engine, options)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print(_describe(summary))
    if summary.get("dry_run"):
        return 0 if summary["plan"]["units"] else EXIT_BAD_INPUT
    totals = summary["totals"]
    if summary["plan"]["units"] == 0:
        print("medlens: no files found under the SOURCEs", file=sys.stderr)
        return EXIT_BAD_INPUT
    if totals["missing"]:
        print(f"medlens: {totals['missing']} unit(s) have no row yet; run the same command again to do them", file=sys.stderr)
        return EXIT_MISSING
    if totals["ok"] == 0:
        print("medlens: no unit could be processed (see failures in summary.json)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _run_audited(spec: TaskSpec, args, engine, options: RunOptions) -> dict[str, Any]:
    """run_batch, with one audit line per run (a dry run changes nothing and is not recorded).

    The line names the job key, the task, the engine and the counts, never a path: the sources and the
    output folder are user text (a folder may be named after a patient). The scans of an archive run are
    not listed in the line (a million hashes would make one 65 MB line); the job key leads to the output's
    rows, which carry each unit's content hash."""
    if args.dry_run:
        return run_batch(spec, args.sources, engine, options)
    from engine import audit
    from engine.auth.users import LOCAL

    with audit.recorded("batch", user=LOCAL, model=spec.model) as entry:
        entry.detail = {"task": spec.task, "job": spec.key(), "engine": args.engine}
        summary = run_batch(spec, args.sources, engine, options)
        totals = summary["totals"]
        entry.model = summary["job"]["model_id"] or spec.model  # with its revision, once a worker has loaded it
        entry.detail.update(
            units=summary["plan"]["units"], rows=summary["run"]["rows"], ok=totals["ok"], errors=totals["errors"], missing=totals["missing"]
        )
    return summary


def _describe(summary: dict[str, Any]) -> str:
    plan = summary["plan"]
    found = (
        f"{plan['units']} unit(s) from {plan['files']} file(s): {plan['series']} DICOM series, "
        f"{plan['single_files']} single files, {plan['refused']} refused at planning"
    )
    if summary.get("dry_run"):
        return "\n".join(
            [
                f"plan: {found}",
                f"      {plan['done_before']} done before, {plan['to_do']} to do",
                f"engine: {summary['engine']}",
                f"out: {summary['out']} (job {summary['job']['key']}: {summary['job']['task']} with {summary['job']['model']})",
            ]
        )
    run, totals = summary["run"], summary["totals"]
    reasons = "; ".join(f"{reason}: {n}" for reason, n in list(totals["failures_by_reason"].items())[:5])
    rate = f"{run['units_per_s']:.2f} units/s" if run["units_per_s"] else "no units run"
    lines = [
        f"{summary['job']['task']}: {run['ok']} ok, {run['errors']} error(s), {run['duplicates']} duplicate(s) this run ({rate}, {run['wall_s']:.1f} s); "
        f"{plan['done_before']} done before",
        f"all rows: {totals['ok']} ok, {totals['errors']} error(s), {totals['duplicates']} duplicate(s), {totals['missing']} missing"
        + (f" [{reasons}]" if reasons else ""),
        f"rows in {summary['out']}/shards, summary {summary['out']}/summary.json; engine {summary['engine']}",
    ]
    return "\n".join(lines)


def register(subparsers) -> None:
    """Add `medlens batch` to engine.cli's subcommands."""
    batch = subparsers.add_parser(
        "batch",
        help="run label, ask or index over a whole archive: resumable, sharded output, local or on Ray",
        description="Run a task over every scan under the SOURCEs (folders, zips, listings of paths with one per line, "
        "single files). A DICOM series split over files is one unit. Rows go to DIR/shards (JSON Lines or Parquet), "
        "a summary to DIR/summary.json; rerunning the same command resumes where it stopped.",
    )
    tasks = batch.add_subparsers(dest="task", required=True, parser_class=type(batch))
    for name, help_text in (
        ("label", "zero-shot labels for every scan"),
        ("ask", "answer questions about every scan"),
        ("index", "add every scan to the library (one writer, batched transactions)"),
    ):
        p = tasks.add_parser(name, help=help_text)
        _common(p)
        getattr(sys.modules[__name__], f"_{name}_options")(p)
        p.set_defaults(func=cmd_batch)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "sources", nargs="+", metavar="SOURCE", help="folder tree, zip, listing (*.txt/*.lst or list:FILE: one path per line), or file"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; one job per folder; rerun to resume)")
    p.add_argument(
        "--engine", choices=("local", "ray"), default="local", help='local (default: this process) or ray (pip install -e ".[scale]")'
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local: worker processes (default 1, in this process); ray: actors (default: one per 2 CPUs, or per GPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: the cores it has; pin it to get bit-identical rows on any engine)",
    )
    p.add_argument(
        "--ray-address", default=None, metavar="ADDR", help="join this Ray cluster (e.g. 10.0.0.5:6379) instead of starting a local Ray"
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="ray: GPUs per actor where the cluster has GPUs (default 1; 0 keeps actors on CPUs)",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="do at most N units still to do in this run")
    p.add_argument("--dry-run", action="store_true", help="find and count the units, print the plan, run nothing")
    p.add_argument("--format", choices=FORMATS, default="jsonl", help="shard format (parquet needs pyarrow)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_UNITS, help=f"units per worker call (default {DEFAULT_BATCH_UNITS})")
    p.add_argument(
        "--shard-rows",
        type=int,
        default=DEFAULT_SHARD_ROWS,
        help=f"rows per shard (default {DEFAULT_SHARD_ROWS}; a shard is also written every {DEFAULT_SHARD_SECONDS:g} s)",
    )
    p.add_argument("--shard-seconds", type=float, default=DEFAULT_SHARD_SECONDS, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="model source (default: $MEDLENS_MODEL / $MEDLENS_ASK_MODEL, else the shipped default)")
    p.add_argument("--json", action="store_true", help="print the summary (or the plan) as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _label_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--labels", nargs="+", metavar="LABEL", default=None, help="labels to rank; default: the preset label set of each scan's modality"
    )
    p.add_argument("--modality", default=None, help="prompt set for every scan (default: each scan's modality)")
    p.add_argument("--mode", choices=("softmax", "present-absent"), default="softmax")
    p.add_argument("--aggregate", choices=("mean", "max"), default="mean", help="volumes: combine slice scores by mean or max")
    p.add_argument("--planes", nargs="+", choices=("axial", "coronal", "sagittal"), default=["axial"])
    p.add_argument("--slices", type=int, default=12, help="volumes: slices sampled per plane (default 12)")
    p.add_argument("--per-slice", action="store_true", help="keep per-slice scores of volumes in the rows")
    p.add_argument(
        "--fov-check",
        choices=("auto", "physical", "off"),
        default=None,
        help="field-of-view check of organ labels on volumes (as medlens label; default: $MEDLENS_FOV_CHECK, else auto)",
    )


def _ask_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--question", dest="questions", action="append", required=True, metavar="Q", help="a question (repeatable)")


def _index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", default=None, help="library file (default: $MEDLENS_LIBRARY, else ~/.local/share/medlens/library.db)")
