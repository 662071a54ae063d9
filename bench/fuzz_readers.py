"""Fuzz the scan readers: N random mutations of real DICOM and NIfTI files.

    python bench/fuzz_readers.py --n 2000 --seed 0          # writes bench/results/fuzz.md

Seeds are pydicom's and nibabel's own test files (every transfer syntax and
pixel pipeline the readers have: uncompressed little/big endian, implicit VR,
deflate, JPEG 2000, JPEG-LS, RLE, JPEG baseline, JPEG lossless, multi-frame,
MONOCHROME1, palette colour; NIfTI-1/2, 3D/4D, gzip) plus, when present, a
real CT slice and CT volume from ../shared/data. Mutations: truncation at a
random offset, 1-20 byte flips biased into the header, deletion of a DICOM
element (half the time one the readers depend on) and hostile values for
DICOM image attributes / NIfTI header fields (dims, datatype, vox_offset,
pixdim, scaling, qform/sform, magic).

Each mutated file goes through `engine.io.load([path])` in a worker process
(tests/_mutate.py). A case passes when it yields at least one Scan or a
ScanError whose message names the file and the problem, in under 5 s, and no
exception raised by engine/ code itself was swallowed by a catch-all handler
on the way. A worker that dies (a native decoder aborting) or hangs is
recorded against the case it was reading and restarted after it.

A failing case is reproduced from its number alone:
    python tests/_mutate.py reproduce INDEX --seed SEED --out /tmp
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import _mutate as mz  # noqa: E402

from _machine import cpu_name  # noqa: E402
from _report import header, package_versions  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[k]


STATUSES = ("scan", "scan_error", "exception", "crash", "hang")


def render(outcomes, info, seeds, args, wall: float) -> str:
    n = len(outcomes)
    failed = [o for o in outcomes if o.failed]
    secs = [o.secs for o in outcomes if o.status not in ("crash", "hang")]
    lines = [
        *header(
            "Reader fuzzing",
            f"python bench/fuzz_readers.py --n {args.n} --seed {args.seed}" + (" --no-shared" if args.no_shared else ""),
            f"{cpu_name()} ({platform.machine()}, {len(__import__('os').sched_getaffinity(0))} usable cores)",
            package_versions("pydicom", "nibabel", "numpy", "pylibjpeg", "pylibjpeg-openjpeg", "pyjpegls", "python-gdcm", "pillow"),
        ),
        f"- Cases: {n}, wall time {wall:.0f} s; worker memory cap {args.mem_gib:g} GiB (RLIMIT_AS), "
        f"peak worker RSS {info['max_worker_rss_kb'] / 1024:.0f} MB, worker restarts {info['worker_restarts']}",
        f"- Read time per case: median {statistics.median(secs) if secs else 0:.3f} s, p99 {percentile(secs, 99):.3f} s, "
        f"max {max(secs) if secs else 0:.3f} s (limit {mz.READ_LIMIT_S:g} s)",
        f"- **Result: {n - len(failed)} of {n} passed, {len(failed)} failed**",
        "",
        "Outcomes: `scan` = loaded (the mutation was harmless or was tolerated), `scan_error` = refused with "
        "the project's ScanError, `exception` = another exception escaped `load`, `crash` = the process died "
        "(native abort/segfault), `hang` = no answer within the hang limit. A case also fails when it takes "
        "over 5 s, when its ScanError message does not name the file and the problem, or when an exception "
        "raised in engine/ code was swallowed by a catch-all (`internal`).",
        "",
        "## By seed",
        "",
        "| seed | what it covers | cases | " + " | ".join(STATUSES) + " | failed | max s |",
        "|---|---|---:|" + "---:|" * len(STATUSES) + "---:|---:|",
    ]
    notes = {s.name: s.note for s in seeds}
    by_seed = defaultdict(list)
    for o in outcomes:
        by_seed[o.seed].append(o)
    for seed in [s.name for s in seeds]:
        group = by_seed.get(seed, [])
        c = Counter(o.status for o in group)
        lines.append(
            f"| {seed} | {notes.get(seed, '')} | {len(group)} | "
            + " | ".join(str(c[s]) for s in STATUSES)
            + f" | {sum(o.failed for o in group)} | {max((o.secs for o in group), default=0):.2f} |"
        )
    lines += [
        "",
        "## By mutation",
        "",
        "| mutation | cases | " + " | ".join(STATUSES) + " | failed | p99 s | max s |",
        "|---|---:|" + "---:|" * len(STATUSES) + "---:|---:|---:|",
    ]
    by_kind = defaultdict(list)
    for o in outcomes:
        by_kind[o.kind].append(o)
    for kind in sorted(by_kind):
        group = by_kind[kind]
        c = Counter(o.status for o in group)
        t = [o.secs for o in group]
        lines.append(
            f"| {kind} | {len(group)} | "
            + " | ".join(str(c[s]) for s in STATUSES)
            + f" | {sum(o.failed for o in group)} | {percentile(t, 99):.3f} | {max(t):.3f} |"
        )
    swallowed = sum(o.n_swallowed for o in outcomes)
    lines += [
        "",
        f"Library exceptions turned into ScanError messages by the readers' handlers: {swallowed} "
        "(expected for corrupt input; listed here so a change in that number is visible).",
    ]
    lines += ["", "## Failures", ""]
    if not failed:
        lines.append("None.")
    else:
        groups: dict[str, list] = defaultdict(list)
        for o in failed:
            groups[_signature(o)].append(o)
        lines.append(
            f"{len(failed)} failing cases in {len(groups)} distinct kinds. Reproduce a case with "
            f"`python tests/_mutate.py reproduce INDEX --seed {args.seed} --out /tmp`."
        )
        for sig, group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            first = group[0]
            lines += ["", f"### {sig} ({len(group)} case{'s' if len(group) > 1 else ''})", ""]
            lines.append(
                "Cases: " + ", ".join(f"{o.index} ({o.seed}, {o.detail})" for o in group[:12]) + (" ..." if len(group) > 12 else "")
            )
            lines += ["", "Problems of case %d:" % first.index, ""]
            lines += [f"- {p}" for p in first.problems]
            tb = first.traceback or (first.internal[0]["traceback"] if first.internal else "")
            if tb:
                tail = "\n".join(tb.strip().splitlines()[-12:])
                lines += ["", "```", tail, "```"]
    return "\n".join(lines) + "\n"


def _signature(o) -> str:
    """Group failures by what went wrong, not by input."""
    if o.status in ("crash", "hang"):
        last = [ln for ln in o.traceback.strip().splitlines() if ln.strip()]
        what = next((ln.strip() for ln in reversed(last) if "what()" in ln or "invalid logic" in ln.lower()), last[-1] if last else "")
        return f"{o.status}: {what[:140]}"
    if o.status == "exception":
        return "uncaught " + o.message.split(":", 1)[0]
    if o.internal:
        s = o.internal[0]
        return f"internal {s['type']} swallowed at {s['origin']}"
    if o.slow:
        return "slow read"
    return "unhelpful message: " + (o.problems[0][:60] if o.problems else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="number of mutated files (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fuzz.md")
    parser.add_argument("--no-shared", action="store_true", help="ignore ../shared/data seeds even when present")
    parser.add_argument("--hang-s", type=float, default=60.0, help="seconds without an answer before a read counts as a hang")
    parser.add_argument("--mem-gib", type=float, default=8.0, help="address-space cap for the worker (0: none)")
    args = parser.parse_args(argv)

    seeds = mz.default_seeds(include_shared=not args.no_shared)
    print(f"{len(seeds)} seeds, {args.n} cases, base seed {args.seed}", file=sys.stderr)
    done = [0]

    def progress(o):
        done[0] += 1
        if o.failed:
            print(f"  case {o.index} FAILED [{o.seed}, {o.detail}]: {'; '.join(o.problems)[:200]}", file=sys.stderr)
        if done[0] % 250 == 0:
            print(f"  {done[0]}/{args.n}", file=sys.stderr)

    t0 = time.perf_counter()
    outcomes, info = mz.run_fuzz(seeds, args.n, args.seed, hang_s=args.hang_s, mem_gib=args.mem_gib, progress=progress)
    wall = time.perf_counter() - t0
    text = render(outcomes, info, seeds, args, wall)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    failed = sum(o.failed for o in outcomes)
    print(f"{len(outcomes) - failed}/{len(outcomes)} passed; table written to {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
