"""Ask-the-scan latency, fp32 encoders against the engine's chosen path: the first answer on a scan and each further question.

    python bench/ask_latency.py                  # medlens-qformer, 3 repeats, fp32 vs auto, same run
    python bench/ask_latency.py --repeats 5 --threads 2

Inputs: the 512x512x20 CT series and the 181x217x181 Colin27 brain MRI from
../shared/data, plus one 2D chest X-ray. Two AskModels are loaded side by
side: one with its frozen encoders forced to fp32 (MEDLENS_INFERENCE=fp32 at
its first encode: the reference), one choosing as the engine does
(engine.models.encoder_path, on an empty decision cache; its one-off probe
and export are reported separately). "Warm" means both are loaded (the app's
and a long CLI run's steady state); the encoding caches are cleared each
repeat, so a first answer always pays for preparing and encoding the scan.

The first answer is timed on a loaded scan: the app reads a scan when it is
opened (the viewer shows it before any question), so what a user waits for
after asking is preparation, encoding, the Q-Former and the evidence map.
Reading the files (for the CT, decoding 20 JPEG 2000 slices) is the same
code on both sides and is reported beside it, with the total a
`medlens ask PATH` run pays for its first question. Repeats alternate fp32 and auto, so other work on
the machine hits both alike; medians and minima are given, with the process
CPU time, and every question's answer is compared between the two (equal
answers: the same answer text; the closed questions' probabilities are shown
beside it).

Writes bench/results/ask_latency.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", REPO.parent / "shared" / "data"))

from _machine import write_result, SHIPPED_GATE, cpu_class, machine_lines, rss_mb, uptime, wait_quiet  # noqa: E402
from _setup import add_out_option, fresh_fastpath_cache  # noqa: E402

INPUTS = {
    "CT series 512x512x20 (DICOM, JPEG 2000)": (
        "volumes/totalsegmentator/ct_dicom_series",
        ["Is the liver visible?", "Which modality is this?", "Is the left kidney visible?", "Which organs are in view?"],
    ),
    "brain MRI 181x217x181 (NIfTI)": (
        "volumes/mricron_atlas/ch2.nii.gz",
        ["Which body region is this?", "Is the cerebellum visible?", "Which modality is this?", "Which organs are in view?"],
    ),
    "chest X-ray 2D (PNG)": (
        "xray/nih_cxr14_1000",
        ["Is there pneumonia?", "Which modality is this?", "Is this image abnormal?", "Which organs are in view?"],
    ),
}
MODES = ("fp32", "auto")


def first_file(path: Path) -> Path:
    return next(p for p in sorted(path.rglob("*.png"))) if path.is_dir() and "xray" in str(path) else path


def load_models(name: str) -> tuple[dict, dict]:
    """{mode: AskModel} with their encoders built (fp32 forced for one), and {mode: seconds to build the encoders}."""
    from engine.ask.model import ask_models, load_ask_folder

    folder = ask_models().get(name) or Path(name.removeprefix("local-dir:"))
    models, build_s = {}, {}
    for mode in MODES:
        if mode == "fp32":
            os.environ["MEDLENS_INFERENCE"] = "fp32"
        else:
            os.environ.pop("MEDLENS_INFERENCE", None)
        model = load_ask_folder(folder, name=name)  # two separate models (load_ask_model keeps one per process)
        t = time.perf_counter()
        model.encoders.encoder(3), model.encoders.encoder(2)  # chosen now, with this setting
        build_s[mode] = time.perf_counter() - t
        models[mode] = model
    os.environ.pop("MEDLENS_INFERENCE", None)
    return models, build_s


def run_input(models: dict, path: Path, questions: list[str], repeats: int) -> dict:
    from engine.io import load_one

    first = {m: [] for m in MODES}
    read = {m: [] for m in MODES}
    cpu = {m: [] for m in MODES}
    further = {m: [] for m in MODES}
    answers: dict[str, list] = {}
    quiet = 0
    for r in range(repeats + 1):  # repeat 0 warms the kernels for this input's shape
        for mode in MODES:
            model = models[mode]
            quiet += wait_quiet(10)
            model._cache.clear()
            r0 = time.perf_counter()
            scan, _ = load_one([str(path)])
            t, c = time.perf_counter(), time.process_time()
            got = [model.ask(scan, questions[0])]
            elapsed, cpu_s = time.perf_counter() - t, time.process_time() - c
            read_s = t - r0
            times = []
            for q in questions[1:]:
                s = time.perf_counter()
                got.append(model.ask(scan, q))
                times.append(time.perf_counter() - s)
            if r:
                first[mode].append(elapsed)
                read[mode].append(read_s)
                cpu[mode].append(cpu_s)
                further[mode].append(max(times))
            answers[mode] = got
    return {
        "first": first,
        "read": read,
        "cpu": cpu,
        "further": further,
        "answers": answers,
        "shape": "x".join(map(str, scan.voxels.shape)),
        "quiet": quiet,
        "passes": 2 * (repeats + 1),
    }


def describe(answer) -> str:
    if answer.closed and answer.candidates:
        return f"{answer.answer} ({100 * answer.candidates[0][1]:.1f}%)"
    return answer.answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medlens-qformer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_out_option(parser, "ask_latency.md")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cache = fresh_fastpath_cache("medlens-ask-bench-")  # load_models sets MEDLENS_INFERENCE per side anyway
    load_before = uptime()
    t0 = time.perf_counter()
    models, build_s = load_models(args.model)
    load_s = time.perf_counter() - t0
    labels = {m: (models[m].encoders.path_label(False), models[m].encoders.path_label(True)) for m in MODES}
    print(f"encoders: {labels}; build {build_s}", flush=True)
    results = {}
    for name, (rel, questions) in INPUTS.items():
        path = first_file(SHARED / rel)
        results[name] = res = run_input(models, path, questions, args.repeats)
        f = {m: statistics.median(v) for m, v in res["first"].items()}
        print(f"{name}: first answer fp32 {f['fp32']:.2f} s, auto {f['auto']:.2f} s ({f['fp32'] / f['auto']:.2f}x)", flush=True)
    gate = SHIPPED_GATE.get(cpu_class())
    lines = (
        ["# Ask latency: fp32 encoders vs the engine's chosen path (bench/ask_latency.py)", ""]
        + machine_lines()
        + [
            f"- torch {torch.__version__}, {args.threads} threads; model {args.model}; peak RSS {rss_mb():.0f} MB",
            f"- encoders: fp32 run = {labels['fp32'][0]} (3D) / {labels['fp32'][1]} (2D); auto run = **{labels['auto'][0]}** (3D) / **{labels['auto'][1]}** (2D)",
            f"- one-off: both models loaded in {load_s:.1f} s; choosing the auto encoders (probe + OpenVINO export, empty cache) {build_s['auto']:.1f} s, "
            f"a later process reads the cached decision and IR",
            f"- load: before `{load_before}`; after `{uptime()}`",
            f"- command: `python bench/ask_latency.py --repeats {args.repeats} --threads {args.threads}`; median (min) of {args.repeats} repeats "
            "after one warm-up per input, fp32 and auto alternating",
            "",
            "| input | voxels | first answer fp32 s | first answer auto s | speed-up | CPU s fp32 / auto | reading the files s | with reading fp32 / auto s (speed-up) | slowest further question fp32 / auto s | quiet passes | answers equal |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
    )
    verdicts = []
    for name, res in results.items():
        f = {m: statistics.median(v) for m, v in res["first"].items()}
        lo = {m: min(v) for m, v in res["first"].items()}
        c = {m: min(v) for m, v in res["cpu"].items()}
        more = {m: statistics.median(v) for m, v in res["further"].items()}
        equal = [a.answer == b.answer for a, b in zip(res["answers"]["fp32"], res["answers"]["auto"])]
        speed = f["fp32"] / f["auto"]
        reading = statistics.median(res["read"]["fp32"] + res["read"]["auto"])
        total = {m: statistics.median([a + b for a, b in zip(res["first"][m], res["read"][m])]) for m in MODES}
        lines.append(
            f"| {name} | {res['shape']} | {f['fp32']:.2f} ({lo['fp32']:.2f}) | {f['auto']:.2f} ({lo['auto']:.2f}) | {speed:.2f}x | "
            f"{c['fp32']:.2f} / {c['auto']:.2f} | {reading:.2f} | {total['fp32']:.2f} / {total['auto']:.2f} "
            f"({total['fp32'] / total['auto']:.2f}x) | {more['fp32']:.3f} / {more['auto']:.3f} | {res['quiet']}/{res['passes']} | "
            f"{sum(equal)}/{len(equal)} |"
        )
        if gate:
            verdicts.append(
                f"| {name}: first answer (scan loaded) >= {gate}x fp32 at equal answers | {speed:.2f}x, {sum(equal)}/{len(equal)} equal | "
                f"{'met' if speed >= gate and all(equal) else '**not met**'} |"
            )
    lines += [
        "",
        "Answers to every question (fp32 | auto; closed questions with the top candidate's probability):",
        "",
        "| input | question | fp32 | auto |",
        "|---|---|---|---|",
    ]
    for name, res in results.items():
        for a, b in zip(res["answers"]["fp32"], res["answers"]["auto"]):
            lines.append(f"| {name} | {a.question} | {describe(a)} | {describe(b)} |")
    if verdicts:
        lines += ["", f"## Gate for this CPU class ({cpu_class()})", "", "| gate | measured | verdict |", "|---|---:|---|"] + verdicts
    write_result(args.out, lines + [""], echo=True)
    cache.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
