"""Library search and indexing speed: engine.library.vectors.VectorIndex vs faiss, and scans/s when indexing.

Part 1, vector search. N random unit vectors of dimension D (256, the
default model's embed_dim) and 64 random unit queries; for each backend:
- build time and memory of the index (RSS delta of the process, and for the
  numpy backends also tracemalloc's retained / peak bytes: numpy reports its
  buffers to tracemalloc, faiss's C++ allocations it cannot see);
- top-10 latency for one query at a time (median and p95 over --singles
  queries) and for a batch of 64 queries (median over --repeats);
backends: VectorIndex numpy float32, numpy float16, numpy float32 with a
filter that allows 10 % of the ids (what the app's modality/body part/label
filters do), VectorIndex(backend="faiss") (faiss plus the engine's tie
re-sort), and faiss IndexFlatIP called directly. Top-10 ids of numpy
float32 and raw faiss are compared query by query (they must be identical:
both are exact); float16 is reported as recall@10 against float32.
Optionally (--db-size) the cost of `index_for` rebuilding the index from
the SQLite library (what the first search after an add pays) and of a warm
(cached) lookup.

Part 2, indexing throughput with `index_paths` into a fresh library:
--images PNGs (256 x 256 grey) and --volumes NIfTI volumes (20 slices,
128 x 128, CT-like values) written with PIL / nibabel under bench/work/,
with the tiny test model (tests/_models.py) and with the shipped default
model `medlens-clip` when assets/models/medlens-clip exists. A volume is
embedded from 12 sampled axial slices (engine.library.store.VOLUME_SLICES).

faiss: `import faiss`, else bench/work/faiss_pkgs (pip install --no-deps
--target bench/work/faiss_pkgs faiss-cpu: keeps faiss out of the venv, so
the engine's `backend="auto"` stays numpy for everything else).

    python bench/vector_search.py                       # 100k and 1M vectors, indexing
    python bench/vector_search.py --sizes 1000 --images 10 --volumes 2 --out /tmp/vs.md   # smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "bench" / "work"
FAISS_DIR = WORK / "faiss_pkgs"
K = 10
BATCH = 64


# --------------------------------------------------------------------------- machine

from _machine import cpu_name, loadavg, rss_mb  # noqa: E402
from _report import bullets, section  # noqa: E402


def import_faiss():
    try:
        import faiss  # type: ignore[import-not-found]

        return faiss
    except ImportError:
        pass
    if FAISS_DIR.is_dir():
        sys.path.insert(0, str(FAISS_DIR))
        try:
            import faiss  # type: ignore[import-not-found]

            return faiss
        except ImportError:
            pass
    return None


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# --------------------------------------------------------------------------- part 1
def measure_build(build):
    """(object, build s, RSS delta MB, tracemalloc retained MB, tracemalloc peak MB)."""
    gc.collect()
    rss0 = rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    obj = build()
    seconds = time.perf_counter() - t0
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gc.collect()
    return obj, seconds, rss_mb() - rss0, current / 2**20, peak / 2**20


def latency(search, queries: np.ndarray, singles: int, repeats: int) -> dict[str, float]:
    for i in range(3):  # warm-up
        search(queries[i : i + 1])
    one = []
    for i in range(singles):
        q = queries[i % len(queries)][None, :]
        t0 = time.perf_counter()
        search(q)
        one.append((time.perf_counter() - t0) * 1000)
    batch = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        search(queries)
        batch.append((time.perf_counter() - t0) * 1000)
    one.sort()
    return {
        "b1_med": statistics.median(one),
        "b1_p95": one[min(len(one) - 1, int(round(0.95 * (len(one) - 1))))],
        "b64_med": statistics.median(batch),
        "b64_min": min(batch),
    }


def bench_size(n: int, d: int, faiss, singles: int, repeats: int, seed: int) -> tuple[list[dict], list[str]]:
    from engine.library.vectors import VectorIndex

    rng = np.random.default_rng(seed)
    base = unit(rng, n, d)
    ids = np.arange(1, n + 1, dtype=np.int64)  # scan ids start at 1
    queries = unit(rng, BATCH, d)
    allowed = ids[rng.random(n) < 0.10]
    rows: list[dict] = []
    notes: list[str] = []
    results: dict[str, np.ndarray] = {}

    def run(name, build, search, mem_note=""):
        obj, build_s, rss, retained, peak = measure_build(build)
        lat = latency(lambda q: search(obj, q), queries, singles, repeats)
        _, top = search(obj, queries)
        results[name] = np.asarray(top)
        rows.append(
            {"n": n, "backend": name, "build_s": build_s, "rss": rss, "retained": retained, "peak": peak, "mem_note": mem_note, **lat}
        )
        print(
            f"  {name:<34} build {build_s:6.2f} s  RSS +{rss:7.1f} MB  b1 {lat['b1_med']:8.2f} ms  b64 {lat['b64_med']:8.1f} ms", flush=True
        )
        obj = None  # free the index before the next backend is built
        gc.collect()

    def vi_search(index, q):
        return index.search(q, K)

    print(f"N = {n:,}, D = {d}", flush=True)
    run("VectorIndex numpy float32", lambda: VectorIndex.build(ids, base, dtype=np.float32, backend="numpy"), vi_search)
    run("VectorIndex numpy float16", lambda: VectorIndex.build(ids, base, dtype=np.float16, backend="numpy"), vi_search)
    run(
        "VectorIndex numpy float32, 10 % filter",
        lambda: VectorIndex.build(ids, base, dtype=np.float32, backend="numpy"),
        lambda index, q: index.search(q, K, allowed_ids=allowed),
    )
    if faiss is not None:
        run("VectorIndex faiss (engine wrapper)", lambda: VectorIndex.build(ids, base, dtype=np.float32, backend="faiss"), vi_search)

        def raw_build():
            flat = faiss.IndexFlatIP(d)
            flat.add(base)
            return flat

        def raw_search(flat, q):
            scores, pos = flat.search(np.ascontiguousarray(q, dtype=np.float32), K)
            return scores, ids[pos]

        run("faiss IndexFlatIP (direct)", raw_build, raw_search, mem_note="RSS only")
        same_set = sum(set(a) == set(b) for a, b in zip(results["VectorIndex numpy float32"], results["faiss IndexFlatIP (direct)"]))
        same_order = sum(np.array_equal(a, b) for a, b in zip(results["VectorIndex numpy float32"], results["faiss IndexFlatIP (direct)"]))
        wrapper = sum(
            np.array_equal(a, b) for a, b in zip(results["VectorIndex numpy float32"], results["VectorIndex faiss (engine wrapper)"])
        )
        notes.append(
            f"N = {n:,}: top-10 ids, numpy float32 vs faiss IndexFlatIP: {same_set}/{BATCH} queries the same set, "
            f"{same_order}/{BATCH} the same order; vs the engine's faiss wrapper: {wrapper}/{BATCH} identical"
        )
    # exact brute force as the reference for the filter and float16
    ref = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :K] + 1 if n <= 200_000 else None
    if ref is not None:
        exact = sum(np.array_equal(a, b) for a, b in zip(results["VectorIndex numpy float32"], ref))
        notes.append(f"N = {n:,}: numpy float32 top-10 equals a full argsort in {exact}/{BATCH} queries")
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(results["VectorIndex numpy float16"], results["VectorIndex numpy float32"])])
    notes.append(f"N = {n:,}: float16 recall@10 against float32: {recall:.4f}")
    allowed_set = set(allowed.tolist())
    ok = all(set(r.tolist()) <= allowed_set for r in results["VectorIndex numpy float32, 10 % filter"])
    notes.append(f"N = {n:,}: filtered search returned only allowed ids: {ok} ({len(allowed):,} allowed)")
    return rows, notes


def bench_db(n: int, d: int, seed: int) -> dict[str, float]:
    """Time index_for rebuilding from a library of n embeddings, then a cached lookup."""
    from engine.library import connect
    from engine.library.db import write
    from engine.library.store import to_blob
    from engine.library.vectors import clear_cache, index_for

    rng = np.random.default_rng(seed)
    folder = Path(tempfile.mkdtemp(dir=WORK, prefix="vs_db_"))
    try:
        path = folder / "library.db"
        t0 = time.perf_counter()
        with connect(path) as db:
            with write(db):
                for start in range(0, n, 10_000):
                    m = min(10_000, n - start)
                    vecs = unit(rng, m, d)
                    db.conn.executemany(
                        "INSERT INTO scans (id, content_hash, modality, shape, spacing, summary, added_at) VALUES (?, ?, 'CT', '[1]', '[1]', '{}', '')",
                        [(start + i + 1, f"h{start + i}") for i in range(m)],
                    )
                    db.conn.executemany(
                        "INSERT INTO embeddings (scan_id, model_id, dim, kind, vector) VALUES (?, 'bench@0', ?, 'image', ?)",
                        [(start + i + 1, d, to_blob(vecs[i])) for i in range(m)],
                    )
        fill_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2**20
        clear_cache()
        with connect(path) as db:
            t0 = time.perf_counter()
            index = index_for(db, "bench@0", backend="numpy")
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            index_for(db, "bench@0", backend="numpy")
            warm = time.perf_counter() - t0
        assert len(index) == n
        clear_cache()
        return {"n": n, "fill_s": fill_s, "size_mb": size_mb, "cold_s": cold, "warm_ms": warm * 1000}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- part 2
def make_inputs(n_images: int, n_volumes: int) -> tuple[Path, Path]:
    import nibabel as nib
    from PIL import Image

    root = WORK / "vector_search_inputs"
    png_dir, nii_dir = root / f"png_{n_images}", root / f"nifti_{n_volumes}"
    rng = np.random.default_rng(0)
    if not (png_dir.is_dir() and len(list(png_dir.glob("*.png"))) == n_images):
        shutil.rmtree(png_dir, ignore_errors=True)
        png_dir.mkdir(parents=True)
        yy, xx = np.mgrid[0:256, 0:256] / 256.0
        for i in range(n_images):
            a, b, c = rng.uniform(1, 8, 3)
            img = 127 + 60 * np.sin(a * xx * np.pi + c) * np.cos(b * yy * np.pi) + rng.normal(0, 20, (256, 256))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(png_dir / f"img{i:04d}.png")
    if not (nii_dir.is_dir() and len(list(nii_dir.glob("*.nii.gz"))) == n_volumes):
        shutil.rmtree(nii_dir, ignore_errors=True)
        nii_dir.mkdir(parents=True)
        zz, yy, xx = np.mgrid[0:20, 0:128, 0:128]
        for i in range(n_volumes):
            body = ((xx - 64) ** 2 / rng.uniform(30, 60) ** 2 + (yy - 64) ** 2 / rng.uniform(30, 60) ** 2) < 1
            vol = np.where(body, 40 + rng.normal(0, 30, body.shape), -1000).astype(np.int16)
            vol[(zz % 7 == i % 7) & body] += 300  # something that differs between volumes
            affine = np.diag([0.8, 0.8, 5.0, 1.0])
            nib.save(nib.Nifti1Image(np.transpose(vol, (2, 1, 0)), affine), nii_dir / f"vol{i:03d}.nii.gz")
    return png_dir, nii_dir


def bench_indexing(model_source: str, label: str, inputs: dict[str, tuple[Path, int]]) -> list[dict]:
    import torch

    from engine.library import index_paths
    from engine.zeroshot import resolve_model

    t0 = time.perf_counter()
    model = resolve_model(model_source)
    load_s = time.perf_counter() - t0
    model.encode_images([np.zeros((64, 64), np.uint8)])  # warm-up
    rows = []
    for kind, (folder, count) in inputs.items():
        db_dir = Path(tempfile.mkdtemp(dir=WORK, prefix="vs_idx_"))
        try:
            t0 = time.perf_counter()
            report = index_paths([folder], db_dir / "library.db", model)
            seconds = time.perf_counter() - t0
        finally:
            shutil.rmtree(db_dir, ignore_errors=True)
        if report.failed or report.added != count:
            raise SystemExit(f"indexing {kind} with {label}: {report.line()} {report.failed[:3]}")
        rows.append(
            {
                "model": label,
                "model_id": model.model_id,
                "embed_dim": model.embed_dim,
                "path": model.path.name,
                "kind": kind,
                "count": count,
                "seconds": seconds,
                "per_s": count / seconds,
                "load_s": load_s,
                "threads": torch.get_num_threads(),
            }
        )
        print(f"  {label:<12} {kind:<36} {count:4d} in {seconds:6.2f} s = {count / seconds:7.1f} scans/s", flush=True)
    return rows


# --------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated numbers of vectors")
    p.add_argument("--dim", type=int, default=256, help="vector dimension (default: medlens-clip's embed_dim)")
    p.add_argument("--singles", type=int, default=50, help="single queries timed per backend")
    p.add_argument("--repeats", type=int, default=10, help="batch-of-64 searches timed per backend")
    p.add_argument("--db-size", type=int, default=100_000, help="library size for the index_for rebuild timing (0: skip)")
    p.add_argument("--images", type=int, default=200, help="PNGs to index (0: skip indexing)")
    p.add_argument("--volumes", type=int, default=10, help="20-slice NIfTI volumes to index")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "vector_search.md"))
    args = p.parse_args()

    import torch

    WORK.mkdir(parents=True, exist_ok=True)
    faiss = import_faiss()
    load_before = loadavg()
    started = dt.datetime.now(dt.timezone.utc)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    search_rows: list[dict] = []
    notes: list[str] = []
    for n in sizes:
        rows, more = bench_size(n, args.dim, faiss, args.singles, args.repeats, args.seed)
        search_rows += rows
        notes += more
    db_row = None
    if args.db_size:
        print(f"index_for rebuild from a library of {args.db_size:,} embeddings", flush=True)
        db_row = bench_db(args.db_size, args.dim, args.seed)
        print(f"  cold {db_row['cold_s']:.2f} s, warm {db_row['warm_ms']:.2f} ms", flush=True)

    index_rows: list[dict] = []
    if args.images or args.volumes:
        sys.path.insert(0, str(REPO / "tests"))
        from _models import tiny_clip_folder

        png_dir, nii_dir = make_inputs(args.images, args.volumes)
        inputs = {}
        if args.images:
            inputs[f"2D PNG 256x256 ({args.images} files)"] = (png_dir, args.images)
        if args.volumes:
            inputs[f"NIfTI 128x128x20 ({args.volumes} volumes)"] = (nii_dir, args.volumes)
        tiny_dir = WORK / "vector_search_tiny_clip"
        if not (tiny_dir / "model.safetensors").is_file():
            tiny_clip_folder(tiny_dir)
        print("indexing", flush=True)
        index_rows += bench_indexing(f"local-dir:{tiny_dir}", "tiny (test)", inputs)
        from engine.models.registry import DEFAULT_MODEL, shipped_models

        if DEFAULT_MODEL in shipped_models():
            index_rows += bench_indexing(DEFAULT_MODEL, DEFAULT_MODEL, inputs)
        else:
            notes.append(f"indexing with the shipped `{DEFAULT_MODEL}`: not run, assets/models/{DEFAULT_MODEL} does not exist yet")
    load_after = loadavg()

    import numpy

    faiss_line = (
        f"faiss-cpu {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads)"
        if faiss is not None
        else "faiss: not importable (pip install faiss-cpu failed or was not run): faiss rows missing"
    )
    lines = [
        "# Library vector search and indexing throughput",
        "",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M')} UTC",
        f"- Command: `{' '.join(['python bench/vector_search.py', *sys.argv[1:]])}`",
        f"- CPU: {cpu_name()}, {os.cpu_count()} cores; load average before {load_before}, after {load_after}",
        f"- Python {platform.python_version()}, numpy {numpy.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); {faiss_line}",
        f"- Vectors: random unit vectors, D = {args.dim}; {BATCH} random unit queries; top-{K}; "
        f"batch 1 = {args.singles} single queries (median / p95), batch {BATCH} = {args.repeats} searches (median / min)",
        "- Memory: RSS delta of building the index (after gc); tracemalloc retained / peak for the numpy backends "
        "(faiss allocates in C++, invisible to tracemalloc). The N x D float32 input itself is not counted.",
        "",
        "## Top-10 search",
        "",
        f"| N | backend | build s | RSS delta MB | tracemalloc retained / peak MB | batch 1 ms (median / p95) | batch {BATCH} ms (median / min) | batch {BATCH} ms per query |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in search_rows:
        tm = "n/a (C++)" if r["mem_note"] else f"{r['retained']:.1f} / {r['peak']:.1f}"
        if "faiss" in r["backend"] and not r["mem_note"]:
            tm = f"{r['retained']:.1f} / {r['peak']:.1f} (+ faiss C++)"
        lines.append(
            f"| {r['n']:,} | {r['backend']} | {r['build_s']:.2f} | {r['rss']:.1f} | {tm} | "
            f"{r['b1_med']:.2f} / {r['b1_p95']:.2f} | {r['b64_med']:.1f} / {r['b64_min']:.1f} | {r['b64_med'] / BATCH:.2f} |"
        )
    lines += bullets("Checks:", notes)
    if db_row:
        lines += section(
            "## Rebuilding the index from the library",
            f"`index_for` reads every embedding of a model from SQLite and builds the index; it does so on the first search "
            f"after any add (the cache key is (count, max id) of the model's embeddings). Library of {db_row['n']:,} embeddings "
            f"(D = {args.dim}, {db_row['size_mb']:.0f} MB file, filled in {db_row['fill_s']:.1f} s): "
            f"rebuild **{db_row['cold_s']:.2f} s**, cached lookup {db_row['warm_ms']:.2f} ms.",
        )
    if index_rows:
        lines += [
            "",
            "## Indexing throughput (`index_paths` into a fresh library)",
            "",
            "| model | model id, dim | inference path | input | scans | seconds | scans/s | model load s |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for r in index_rows:
            lines.append(
                f"| {r['model']} | `{r['model_id'].split('/')[-1]}`, {r['embed_dim']} | {r['path']} | {r['kind']} | {r['count']} | "
                f"{r['seconds']:.2f} | {r['per_s']:.1f} | {r['load_s']:.1f} |"
            )
        lines += [
            "",
            "Each scan: read + de-identify, embed (a 2D image: one forward; a volume: 12 sampled axial slices), "
            "PNG thumbnail, one SQLite transaction. Inputs are synthetic (generated under bench/work/vector_search_inputs).",
        ]
    lines += [
        "",
        "Re-run: `python bench/vector_search.py` (options: --sizes, --dim, --singles, --repeats, --db-size, --images, --volumes).",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
