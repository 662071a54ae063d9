"""`medlens` command line.

Conventions: results on stdout (JSON Lines with --json), problems on stderr
as one line each; exit status 0 when something useful was produced, 2 on bad
input (nothing loadable, bad arguments); `ask` exits 2 as soon as any
question about any PATH went unanswered (each failure is reported); with
--export/--push, `label` and `ask` exit 2 when any scan's results could not
be written or stored. Never a stack trace: unexpected errors become a
one-line message as well. New subcommands live in their own module with a
`register(subparsers)` (engine.pacs.cli, engine.audit.cli, engine.auth.cli);
the results flags of `label` and `ask` come from engine.results.cli.

The CLI is the single local user: no login, the library's `local` owner,
and `local` in the audit log (one line per scan labelled or asked about,
per index run, search and teach; engine.audit.recorded around each).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from engine import audit, settings
from engine.auth.users import LOCAL
from engine.errors import MedLensError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and a single line (its default is a usage block)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _print_skipped(result) -> None:
    for message in result.messages():
        print(f"medlens: skipped {message}", file=sys.stderr)


def _redaction(scan) -> dict:
    """What burned-in text removal did (engine.redact), for JSON rows: boxes and status, never text."""
    record = scan.provenance.redaction
    return {"redaction": record.to_dict() if record else None}


def cmd_info(args) -> int:
    from engine.io import load
    from engine.redact import redaction_message

    result = load(args.paths)
    _print_skipped(result)
    for i, scan in enumerate(result.scans):
        summary = scan.summary()
        if args.json:
            where = {"path": args.paths[0]} if len(args.paths) == 1 else {"paths": list(args.paths)}
            print(json.dumps({**where, "series": i, "n_series": len(result.scans), **summary}, default=str))
        else:
            print(f"[{i}] {scan.label}")
            print(f"    modality     {summary['modality']}")
            print(f"    shape        {' x '.join(map(str, summary['shape']))}")
            print(f"    spacing (mm) {' x '.join(f'{s:g}' for s in summary['spacing_mm'])}")
            print(f"    orientation  {summary['orientation']}")
            print(f"    reader       {summary['reader']}" + (f" ({summary['transfer_syntax']})" if summary["transfer_syntax"] else ""))
            for w in summary["warnings"]:
                print(f"    warning      {w}")
            if redaction_message(scan):
                print(f"    burned-in    {redaction_message(scan)}")
    if not args.json:
        print(f"{len(result.scans)} series found" + (f", {len(result.skipped)} file(s) skipped" if result.skipped else ""))
    return 0


def cmd_convert(args) -> int:
    from engine.export import save_nifti
    from engine.io import load_one

    scan, result = load_one(args.paths, series=args.series)
    _print_skipped(result)
    if args.volume is not None:
        scan = scan.volume(args.volume)
    out = save_nifti(scan, args.output)
    print(f"wrote {out} ({' x '.join(map(str, scan.voxels.shape[::-1]))}, RAS+)")
    return 0


def cmd_label(args) -> int:
    """Zero-shot labels for each PATH with one model load; a bad PATH never stops the others."""

    from engine.io import load_one
    from engine.results.cli import ResultSink, describe, progress, query_paths, report_errors
    from engine.zeroshot import SOFTMAX, clean_labels, label_scan, load_prompt_set, resolve_model

    # everything that can be checked without a model or a scan is checked first
    labels = clean_labels(args.labels) if args.labels is not None else None
    if labels is not None and args.mode == SOFTMAX and len(labels) < 2:
        raise MedLensError(
            "a softmax over one label always gives 1: give at least two labels, or --mode present-absent to score one finding"
        )
    if args.slices < 1:
        raise MedLensError(f"--slices must be at least 1 (got {args.slices})")
    fixed_prompts = load_prompt_set(args.modality) if args.modality else None
    sink = ResultSink.from_args(args)
    paths = list(args.paths) + (query_paths(args.pacs_query) if args.pacs_query else [])
    if not paths:
        raise MedLensError("give at least one PATH, or --pacs-query to label what a PACS search returns")
    model = resolve_model(args.model or settings.MODEL.get())
    labelled = 0
    for path in progress(paths, bool(args.pacs_query)):
        try:
            with audit.recorded("label", user=LOCAL, model=model) as entry:
                scan, result = load_one([path], series=args.series)
                _print_skipped(result)
                entry.scan(scan)
                out = label_scan(
                    scan,
                    labels,
                    model,
                    prompt_set=fixed_prompts,
                    mode=args.mode,
                    aggregation=args.aggregate,
                    planes=tuple(args.planes),
                    n_slices=args.slices,
                    fov_check=args.fov_check,
                    volume_model=settings.ASK_MODEL.get(),
                )
        except MedLensError as exc:
            message = _one_line(str(exc))
            if args.json:
                print(json.dumps({"path": path, "error": message}), flush=True)
            else:
                print(f"medlens: {message if message.startswith(path) else f'{path}: {message}'}", file=sys.stderr)
            continue
        labelled += 1
        done = sink.label_done(path, scan, out, model, fixed_prompts) if sink else {}
        report_errors(path, done)
        if args.json:
            print(json.dumps({"path": path, **out.to_dict(per_slice=args.per_slice), **_redaction(scan), **done}), flush=True)
            continue
        for line in label_lines(path, out):
            print(line)
        for line in describe(path, done):
            print(line)
    if sink:
        sink.close()
    if labelled == 0:
        print(f"medlens: no PATH could be labelled ({len(paths)} given)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_BAD_INPUT if sink and sink.failures else 0


def label_lines(path: str, out) -> list[str]:
    """The text output of one label result: reported probability and verdict per label, reasons, warnings."""
    from engine.zeroshot import PRESENT_ABSENT

    where = (
        "2D image"
        if out.aggregation is None
        else f"{len(out.per_slice)} slices ({', '.join(dict.fromkeys(s.plane for s in out.per_slice))}), {out.aggregation} over slices"
    )
    kind = "P(present)" if out.mode == PRESENT_ABSENT else "probability"
    lines = [
        f"{path}: {out.modality} {where}; prompts '{out.prompt_set}'; {kind}; model {out.model_id} ({out.inference_path})",
        f"  {out.trust_note}",
    ]
    if out.field_of_view:
        fov = out.field_of_view
        lines.append(f"  field of view: {fov['main_region']} ({100 * fov['main_region_probability']:.0f}%): {'; '.join(fov['evidence'])}")
    elif out.fov_note:
        lines.append(f"  {out.fov_note}")
    width = max(len(s.label) for s in out.labels)
    for s in out.labels:
        raw = "" if abs(s.shown - s.probability) < 5e-5 else f"  (model {100 * s.probability:.1f}%)"
        lines.append(f"  {100 * s.shown:6.2f}%  {s.label:<{width}}  {s.verdict or '':<13} cosine {s.score:+.4f}{raw}")
    lines += [f"    {reason}" for s in out.labels for reason in s.reasons]
    if out.ood is not None and out.ood.out_of_distribution:
        lines.append("  WARNING out of distribution: " + "; ".join(out.ood.reasons))
    return lines


def _ask_source(args) -> str | None:

    return args.model or settings.ASK_MODEL.get()


def _ask_failed(args, path: str, message: str, question: str | None = None) -> None:
    message = _one_line(message)
    if args.json:
        row = {"path": path, **({"question": question} if question is not None else {}), "error": message}
        print(json.dumps(row, ensure_ascii=False), flush=True)
        return
    where = path if question is None else f"{path}: question '{_one_line(question)[:80]}'"
    print(f"medlens: {message if message.startswith(path) else f'{where}: {message}'}", file=sys.stderr)


def _checked_questions(args) -> list[tuple[str, str | None, str | None]]:
    """(as given, cleaned, error) per question of `ask`; MedLensError when none of them can be asked."""
    from engine.ask.questions import QuestionError, validate_question

    checked: list[tuple[str, str | None, str | None]] = []
    for question in [args.question, *(args.questions or [])]:
        try:
            checked.append((question, validate_question(question), None))
        except QuestionError as exc:
            checked.append((question, None, str(exc)))
    if all(cleaned is None for _, cleaned, _ in checked):
        first = checked[0][2]
        raise MedLensError(first if len(checked) == 1 else f"no question can be asked: {first}")
    return checked


def _asked_scan_line(path: str, scan, model) -> str:
    """The text-output line that introduces a scan's answers: what it is and which model answers."""
    kind = (
        "2D image" if scan.is_2d else "volume" if scan.n_volumes == 1 else f"series of {scan.n_volumes} volumes (the first is asked about)"
    )
    return f"{path}: {scan.modality.value} {kind} {'x'.join(map(str, scan.volume_shape))}; model {model.name}"


def _write_ask_results(args, sink, path: str, scan, answers: list, model) -> bool:
    """Export/push one scan's answers (--export/--push) and report what was written; False when any of it failed."""
    from engine.results.cli import describe, report_errors

    done = sink.ask_done(path, scan, answers, model)
    report_errors(path, done)
    if args.json:
        print(json.dumps({"path": path, **done}, ensure_ascii=False), flush=True)
    else:
        for line in describe(path, done):
            print(line)
    return not any(k.endswith("_error") for k in done)


def cmd_ask(args) -> int:
    """Questions about each PATH with one model load; a scan is encoded once for all its questions.

    A bad PATH (or a scan the model cannot read, e.g. a 2D image for a 3D-only model) gives
    {"path", "error"} and the rest go on; a question that cannot be asked gives
    {"path", "question", "error"}. Exit 0 only when every question about every PATH was answered.
    """
    from engine.ask.api import resolve_ask_model
    from engine.io import load_one
    from engine.results.cli import ResultSink

    checked = _checked_questions(args)  # before any model or scan is loaded
    sink = ResultSink.from_args(args)
    model = resolve_ask_model(_ask_source(args))
    answered = failed = 0
    for path in args.paths:
        answers = []
        try:
            scan, result = load_one([path], series=args.series)
            _print_skipped(result)
            model.encode(scan)  # once per scan; every question reuses it (and a scan the model cannot read fails here)
        except MedLensError as exc:
            audit.record("ask", user=LOCAL, model=model, outcome=audit.outcome_of(exc))  # the questions about it were not asked
            failed += 1
            _ask_failed(args, path, str(exc))
            continue
        if not args.json:
            print(_asked_scan_line(path, scan, model))
        for question, cleaned, error in checked:
            if cleaned is None:
                failed += 1
                _ask_failed(args, path, error or "this question cannot be asked", question)
                continue
            try:
                with audit.recorded("ask", user=LOCAL, model=model) as entry:
                    entry.scan(scan)
                    answer = model.ask(scan, cleaned, with_evidence=sink is not None)  # evidence only for the SEG
            except MedLensError as exc:
                failed += 1
                _ask_failed(args, path, str(exc), question)
                continue
            answered += 1
            answers.append(answer)
            if args.json:
                print(json.dumps(answer_row(path, answer, _redaction(scan)), ensure_ascii=False), flush=True)
                continue
            for line in answer_lines(answer):
                print(line)
        if sink and answers:
            failed += 0 if _write_ask_results(args, sink, path, scan, answers, model) else 1
    if sink:
        sink.close()
    if failed:
        if answered == 0:
            print(f"medlens: no question could be answered ({len(args.paths)} PATH(s), {len(checked)} question(s))", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def answer_row(path: str, answer, extra: dict | None = None) -> dict:
    """One `ask --json` row: the answer with its raw and calibrated confidence, verdict and OOD flag."""
    data = answer.to_dict()
    row = {"path": path, **{k: data[k] for k in ("question", "answer", "confidence")}, **(extra or {})}
    if answer.closed:
        row["candidates"] = data["candidates"]
    keys = ("calibrated_confidence", "verdict", "uncertain", "trust", "out_of_distribution", "ood_score", "ood_threshold", "ood_reasons")
    return {**row, **{k: data[k] for k in keys}}


def answer_lines(answer) -> list[str]:
    """The text output of one answer: the verdict with its number, the candidates, any warning."""
    shown = answer.calibrated_confidence if answer.calibrated_confidence is not None else answer.confidence
    kind = (
        "calibrated" if answer.calibrated_confidence is not None else ("not calibrated" if answer.closed else "generated, not calibrated")
    )
    head = f"  A: {answer.answer}  (confidence {100 * shown:.1f}%, {kind})"
    if answer.uncertain:
        head = f"  A: uncertain (best guess {answer.answer}: {100 * shown:.1f}%, {kind})"
    lines = [f"  Q: {answer.question}", head]
    cal = answer.calibrated or {}
    for candidate, probability in answer.candidates if answer.closed else []:
        lines.append(f"     {100 * cal.get(candidate, probability):6.2f}%  {candidate}")
    if answer.ood is not None and answer.ood.out_of_distribution:
        lines.append("  WARNING out of distribution: " + "; ".join(answer.ood.reasons))
    return lines


def cmd_models(args) -> int:
    from dataclasses import asdict

    from engine.ask.model import DEFAULT_ASK_MODEL
    from engine.models import DEFAULT_MODEL, catalog, list_models

    if args.speed:
        from engine.models.speed_report import print_speed

        return print_speed(as_json=args.json)
    entries = list_models()
    asking = [
        {"name": m.name, "source": m.name, "where": str(m.folder), "available_offline": True, "licence": m.licence, "note": m.note}
        for m in catalog.shipped(catalog.ASK).values()
    ]
    if args.json:
        for entry in entries:
            print(json.dumps({**asdict(entry), "default": entry.name == DEFAULT_MODEL, "task": "label"}))
        for entry in asking:
            print(json.dumps({**entry, "default": entry["name"] == DEFAULT_ASK_MODEL, "task": "ask"}))
        return 0
    rows = [
        (e.name + (" (default)" if e.name == DEFAULT_MODEL else ""), e.source, "yes" if e.available_offline else "no (downloads)", e.where)
        for e in entries
    ]
    _print_table(rows)
    if not any(e.name == DEFAULT_MODEL for e in entries):
        print(f"default model '{DEFAULT_MODEL}' is not installed: pass --model NAME, hf-hub:org/repo or local-dir:/path/to/checkpoint")
    print("also accepted: --model local-dir:/path/to/checkpoint (MedLens, open_clip or UniMed-CLIP folder), hf-hub:org/repo")
    print()
    print("question answering (medlens ask --model; the app reads MEDLENS_ASK_MODEL):")
    if asking:
        _print_table(
            [(e["name"] + (" (default)" if e["name"] == DEFAULT_ASK_MODEL else ""), e["source"], "yes", e["where"]) for e in asking]
        )
    if not any(e["name"] == DEFAULT_ASK_MODEL for e in asking):
        print(
            f"default question-answering model '{DEFAULT_ASK_MODEL}' is not installed: pass --model local-dir:/path/to/qformer-checkpoint"
        )
    print("also accepted: --model local-dir:/path/to/qformer-checkpoint (a MedLens Q-Former folder)")
    return 0


def _print_table(rows: list[tuple[str, str, str, str]]) -> None:
    header = ("name", "source (--model)", "offline", "loads from")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    print("  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  " + header[3])
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row[:3], widths)) + "  " + row[3])


# --------------------------------------------------------------------------- library (index / search / teach)
def _library_model(args):

    from engine.zeroshot import resolve_model

    return resolve_model(args.model or settings.MODEL.get())


def cmd_index(args) -> int:
    """Index scans into the library; exit 0 when anything is indexed or already there."""
    from engine.library import index_paths, library_path

    model = _library_model(args)
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="input", file=sys.stderr, desc="indexing", disable=args.quiet or None, leave=False)
        bar.n = done
        bar.refresh()

    try:
        with audit.recorded("index", user=LOCAL, model=model) as entry:
            report = index_paths(args.paths, args.library, model, progress=progress, shared=args.shared)
            entry.detail = {
                "added": report.added,
                "present": report.present,
                "embedded": report.embedded,
                "failed": len(report.failed),
                "shared": bool(args.shared),
            }
            if report.scan_ids:
                from engine.library import connect
                from engine.library.store import content_hashes

                with connect(args.library, create=False) as db:
                    entry.scan(*content_hashes(db, report.scan_ids))
    finally:
        if bar is not None:
            bar.close()
    for path, reason in report.failed:
        print(f"medlens: skipped {_one_line(path)}: {_one_line(reason)}", file=sys.stderr)
    where = library_path(args.library)
    if args.json:
        print(
            json.dumps(
                {
                    "added": report.added,
                    "present": report.present,
                    "embedded": report.embedded,
                    "failed": len(report.failed),
                    "library": str(where),
                    "model_id": model.model_id,
                }
            )
        )
    else:
        print(f"{report.line()} (library {where}, model {model.model_id})")
    if report.indexed == 0:
        print("medlens: nothing could be indexed", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _like_scan(value: str, series: int | None):
    """--like: a path to load, or the id of a library scan (a number that is not a path)."""
    import os

    from engine.io import load_one

    if not os.path.exists(value) and value.strip().lstrip("#").isdigit():
        return int(value.strip().lstrip("#"))
    scan, result = load_one([value], series=series)
    _print_skipped(result)
    return scan


def cmd_search(args) -> int:
    from engine.library import connect, counts, search
    from engine.library.store import content_hashes

    if not (args.query and args.query.strip()) and args.like is None:
        raise MedLensError('give a text QUERY, --like PATH, or both (e.g. medlens search "pleural effusion")')
    if args.k < 1:
        raise MedLensError(f"--k must be at least 1 (got {args.k})")
    like = _like_scan(args.like, args.series) if args.like is not None else None
    model = _library_model(args)
    with audit.recorded("search", user=LOCAL, model=model) as entry, connect(args.library, create=False) as db:
        if like is not None:
            entry.scan(*(content_hashes(db, [like]) if isinstance(like, int) else [like]))
        hits = search(
            db,
            model,
            args.query,
            like=like,
            k=args.k,
            modality=args.modality,
            body_part=args.body_part,
            label=args.label,
            ensemble=args.ensemble,
        )
        entry.results = [h.content_hash for h in hits if h.content_hash]
        if not hits:
            n = counts(db)["embeddings"].get(model.model_id, 0)
            if n == 0:
                print(
                    f"medlens: no scan in the library is indexed with model {model.model_id}; run medlens index PATH --model ...",
                    file=sys.stderr,
                )
            else:
                print("medlens: no match (the filters may exclude every scan)", file=sys.stderr)
    for hit in hits:
        if args.json:
            ood = hit.ood.to_dict() if hit.ood is not None else {}
            print(
                json.dumps(
                    {
                        "scan_id": hit.scan_id,
                        "score": round(hit.score, 6),
                        "modality": hit.modality,
                        "source": hit.source,
                        **{k: ood.get(k) for k in ("out_of_distribution", "ood_score", "ood_threshold", "ood_reasons")},
                    }
                )
            )
        else:
            part = f" {hit.body_part}" if hit.body_part else ""
            warn = (
                "  [out of distribution: " + "; ".join(hit.ood.reasons) + "]" if hit.ood is not None and hit.ood.out_of_distribution else ""
            )
            print(f"{hit.score:8.4f}  #{hit.scan_id:<6} {hit.modality}{part}  {hit.source or ''}{warn}")
    if hits and not args.json:
        kinds = {
            "cosine": "cosine similarity",
            "bm25": "keyword match (BM25)",
            "rrf": "rrf (reciprocal rank fusion of the text, scan and keyword rankings)",
        }
        print(f"{len(hits)} hit(s); score: {kinds.get(hits[0].ranking, hits[0].ranking)}")
    return 0


def _resolve_examples(db, model, items: list[str]) -> list[int]:
    """Scan ids for --positive/--negative items: a library id, or a path (found by source, else indexed now)."""
    import os

    from engine.io import load
    from engine.library.indexing import add_scan
    from engine.library.store import get_scan, has_embedding, scan_ids_by_source
    from engine.pacs.locator import is_locator

    ids: list[int] = []
    for item in items:
        text = item.strip()
        if not os.path.exists(text) and text.lstrip("#").isdigit():
            sid = int(text.lstrip("#"))
            if get_scan(db, sid) is None:
                raise MedLensError(f"no scan #{sid} in the library")
            if not has_embedding(db, sid, model.model_id):
                raise MedLensError(
                    f"scan #{sid} has no embedding for model {model.model_id}; index its source with this model (medlens index PATH --model ...)"
                )
            ids.append(sid)
            continue
        known = scan_ids_by_source(db, text)
        if known and all(has_embedding(db, sid, model.model_id) for sid in known):
            ids.extend(known)
            continue
        if not os.path.exists(text) and not is_locator(text):
            raise MedLensError(f"{text}: not a library scan id and no such file or folder")
        result = load([text])  # not indexed yet (or not with this model): index it now
        _print_skipped(result)
        ids.extend(add_scan(db, scan, model, source=text)[0] for scan in result.scans)
    return list(dict.fromkeys(ids))


def cmd_teach(args) -> int:
    from engine.library import connect, teach

    model = _library_model(args)
    with audit.recorded("teach", user=LOCAL, model=model) as entry, connect(args.library) as db:
        positives = _resolve_examples(db, model, args.positive)
        negatives = _resolve_examples(db, model, args.negative)
        entry.detail = {"positives": len(positives), "negatives": len(negatives)}
        probe = teach(db, args.label, positives, negatives, model.model_id)
    if args.json:
        print(json.dumps(probe.summary()))
        return 0
    m = probe.metrics
    print(
        f"probe '{probe.label}' (model {probe.model_id}): {probe.n_pos} positive, {probe.n_neg} negative; "
        f"training accuracy {m['train_accuracy']:.2f}; cross-validated balanced accuracy {m['cv_balanced_accuracy']:.2f} ({m['cv_folds']}-fold)"
    )
    return 0


def _add_series_and_json(p, json_help: str) -> None:
    """The options `label` and `ask` share for their PATHs: which series, and JSON Lines output (described by `json_help`)."""
    p.add_argument("--series", type=int, default=None, help="which series (0-based, as listed by info) when a PATH holds several")
    p.add_argument("--json", action="store_true", help=json_help)


def _add_label_parser(sub) -> None:
    from engine.results.cli import add_output_args

    p = sub.add_parser("label", help="zero-shot labels for scans (one model load for all PATHs)")
    p.add_argument("paths", nargs="*", metavar="PATH", help="a file, a folder or zip holding one series, or dicomweb:STUDY/SERIES")
    p.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        default=None,
        help="labels to rank (quote multi-word labels; commas also separate labels); default: the preset label set of the scan's modality",
    )
    p.add_argument(
        "--model",
        default=None,
        help="shipped name, hf-hub:org/repo or local-dir:/path (default: $MEDLENS_MODEL, else the shipped default; see `medlens models`)",
    )
    p.add_argument(
        "--modality",
        default=None,
        help="prompt set to use (xray, ct, mr, us, pathology, fundus, dermoscopy, other); default: the scan's modality",
    )
    p.add_argument(
        "--mode",
        choices=("softmax", "present-absent"),
        default="softmax",
        help="softmax over labels, or an independent present/absent probability per label",
    )
    p.add_argument("--aggregate", choices=("mean", "max"), default="mean", help="volumes: combine slice scores by their mean or max")
    p.add_argument(
        "--planes", nargs="+", choices=("axial", "coronal", "sagittal"), default=["axial"], help="volumes: planes to sample slices from"
    )
    p.add_argument("--slices", type=int, default=12, help="volumes: slices sampled per plane (default 12)")
    _add_series_and_json(
        p,
        'JSON Lines: {"path", "labels": [{"label", "probability", "reported_probability", "verdict", ...}, ...], '
        '"out_of_distribution", "ood_reasons", "field_of_view", ...} or {"path", "error"} per PATH',
    )
    p.add_argument("--per-slice", action="store_true", help="with --json: include per-slice scores of volumes")
    p.add_argument(
        "--fov-check",
        choices=("auto", "physical", "off"),
        default=None,
        help="volumes: bound organ labels by the field of view: auto (the Q-Former's body region + DICOM header + the scan's size), "
        "physical (header and size only), off (raw 2D answers); default: $MEDLENS_FOV_CHECK, else auto",
    )
    add_output_args(p, query=True)
    p.set_defaults(func=cmd_label)


def _add_library_parsers(sub) -> None:
    library_help = "library file (default: $MEDLENS_LIBRARY, else ~/.local/share/medlens/library.db)"
    model_help = "model whose embeddings are stored and searched (default: $MEDLENS_MODEL, else the shipped default)"

    p = sub.add_parser("index", help="add scans (files, folders, zips) to the searchable library; resumable")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files/folders/zips, NIfTI, PNG/JPEG/TIFF; folders are walked")
    p.add_argument("--library", default=None, help=library_help)
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument(
        "--json", action="store_true", help='print the summary as one JSON object {"added", "present", "embedded", "failed", ...}'
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--shared", action="store_true", help="share the scans with every user of a shared server's app (a teaching collection)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="find library scans by text, by example scan, or both")
    p.add_argument(
        "query", nargs="?", default=None, metavar="QUERY", help='free text, e.g. "pleural effusion" (also matched against notes)'
    )
    p.add_argument("--like", default=None, metavar="PATH_OR_ID", help="scans similar to this file/folder, or to library scan ID")
    p.add_argument("--series", type=int, default=None, help="with --like: which series when PATH holds several")
    p.add_argument("--k", type=int, default=10, help="number of hits (default 10)")
    p.add_argument("--modality", default=None, help="only this modality (CT, MR, XRAY, US, PATHOLOGY, FUNDUS, DERMOSCOPY, OTHER)")
    p.add_argument("--body-part", default=None, help="only this BodyPartExamined (e.g. CHEST)")
    p.add_argument("--label", default=None, help="only scans with this taught label (probe P >= 0.5, or tagged positive)")
    p.add_argument(
        "--ensemble", action="store_true", help="embed QUERY through the modality's prompt templates too (for short, label-like queries)"
    )
    p.add_argument("--library", default=None, help=library_help)
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument(
        "--json",
        action="store_true",
        help='JSON Lines, one hit per line: {"scan_id", "score", "modality", "source", "out_of_distribution", "ood_score", "ood_threshold", "ood_reasons"}',
    )
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("teach", help="teach a label from positive and negative examples (a linear probe on embeddings)")
    p.add_argument("label", metavar="LABEL")
    p.add_argument(
        "--positive",
        nargs="+",
        required=True,
        metavar="ID_OR_PATH",
        help="library scan ids, or paths (looked up by source, indexed if new)",
    )
    p.add_argument("--negative", nargs="+", required=True, metavar="ID_OR_PATH", help="as --positive")
    p.add_argument("--library", default=None, help=library_help)
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--json", action="store_true", help="print the probe summary as JSON")
    p.set_defaults(func=cmd_teach)


def build_parser() -> argparse.ArgumentParser:
    from engine.results.cli import add_output_args

    parser = _Parser(prog="medlens", description="MedLens: medical scans in, shown right, labelled zero-shot.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="describe the scans found in files, folders or zips")
    p.add_argument("paths", nargs="+", help="DICOM files/folders/zips, NIfTI, PNG/JPEG/TIFF")
    p.add_argument("--json", action="store_true", help="JSON Lines, one object per series")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="write a scan as NIfTI in RAS+")
    p.add_argument("paths", nargs="+")
    p.add_argument("-o", "--output", required=True, help="OUT.nii or OUT.nii.gz")
    p.add_argument("--series", type=int, default=None, help="which series (0-based, as listed by info) when several are found")
    p.add_argument("--volume", type=int, default=None, help="write one volume of a 4D scan (0-based)")
    p.set_defaults(func=cmd_convert)

    _add_label_parser(sub)

    p = sub.add_parser(
        "ask",
        help="ask questions about scans (one model load for all PATHs; each scan is encoded once)",
        description='Ask questions about scans with the Q-Former, e.g. medlens ask chest_ct.zip "Is the liver visible?" '
        '--question "What is the imaging modality?". The last positional argument is the question. '
        "Exit status 0 when every question about every PATH was answered, else 2.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="a file, or a folder or zip holding one series")
    p.add_argument("question", metavar="QUESTION", help="the question (quote it); any language, at most 500 characters")
    p.add_argument("--question", dest="questions", action="append", default=None, metavar="Q", help="one more question (repeatable)")
    p.add_argument(
        "--model",
        default=None,
        help="question-answering model: shipped name or local-dir:/path (default: $MEDLENS_ASK_MODEL, else the shipped medlens-qformer; see `medlens models`)",
    )
    _add_series_and_json(
        p,
        'JSON Lines, one per question: {"path", "question", "answer", "confidence"} (+ "candidates" for closed questions), '
        'or {"path", "error"} / {"path", "question", "error"}',
    )
    add_output_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("models", help="list the models `label` and `ask` can load and where they come from")
    p.add_argument("--json", action="store_true", help="JSON Lines, one object per model")
    p.add_argument(
        "--speed", action="store_true", help="the CPU inference path chosen and measured for each model on this machine (cached decisions)"
    )
    p.set_defaults(func=cmd_models)

    _add_library_parsers(sub)

    from engine.audit.cli import register as register_audit
    from engine.auth.cli import register as register_user

    register_audit(sub)
    register_user(sub)

    from engine.pacs.cli import register as register_pacs

    register_pacs(sub)

    from engine.batch.cli import register as register_batch

    register_batch(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except _UsageError as exc:
        print(f"medlens: {exc} (see medlens --help)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MedLensError as exc:
        print(f"medlens: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("medlens: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a stack trace for a user
        print(f"medlens: unexpected error: {type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())[:1000]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
