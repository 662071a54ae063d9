"""`medlens models --speed`: the inference path each model runs on this machine, as the choosers cached it.

The choosers (engine.models.fastpath for CLIP image towers, engine.models.
encoder_path for the Q-Former's encoders) probe on first load and write
their verdict to engine.models.decisions; this prints those verdicts, per
model and batch-size class, with the probe's speed-up over fp32. Decisions
made for another CPU, other library versions or a thread count that is not
this process's are listed as "stale" (they are not used here).
"""

from __future__ import annotations

import json

from engine.models import decisions


def speed_rows() -> list[dict]:
    """One row per cached decision, newest first."""
    rows = []
    for d in decisions.remembered():
        rows.append(
            {
                "model": d.model,
                "kind": d.kind,
                "paths": {f"batch {b}": name for b, name in sorted(d.by_batch.items(), key=lambda kv: int(kv[0]))},
                "speedup": {f"batch {b}": round(v, 2) for b, v in sorted(d.speedup.items(), key=lambda kv: int(kv[0]))},
                "cpu": d.cpu,
                "threads": d.threads,
                "decided": d.decided,
                "current": d.current,
            }
        )
    return rows


def print_speed(as_json: bool = False) -> int:
    rows = speed_rows()
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return 0
    folder = decisions.cache_dir()
    if not rows:
        where = "MEDLENS_FASTPATH_CACHE=off: nothing is cached" if folder is None else f"none cached in {folder}"
        print(f"no inference path decided yet ({where}); the first `medlens label`, `index` or `ask` on this machine measures them")
        return 0
    header = ("model", "kind", "path per batch size", "speed-up vs fp32", "threads", "decided", "")
    table = [header]
    for r in rows:
        paths = ", ".join(f"{b}: {n}" for b, n in r["paths"].items())
        speed = ", ".join(f"{b}: {v:.1f}x" for b, v in r["speedup"].items()) or "-"
        table.append(
            (r["model"], r["kind"], paths, speed, str(r["threads"]), r["decided"], "" if r["current"] else "stale (other CPU/versions)")
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    print(f"CPU: {rows[0]['cpu']}; cache: {folder} (MEDLENS_FASTPATH_CACHE); delete decisions.json there to measure again")
    return 0
