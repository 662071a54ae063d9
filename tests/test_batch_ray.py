"""`medlens batch --engine ray`: the same rows as the local engine, a worker killed mid-run, a two-node cluster on this machine.

Skipped when Ray is not installed (pip install -e ".[scale]"), unless MEDLENS_REQUIRE_RAY=1 (CI), where that is a failure.
Ray's session files, sockets and auth token stay in pytest's temporary folders and HOME points there too, so nothing
is left in the user's home; Ray listens on loopback only and is shut down after each test.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

# Before Ray is imported in this process: every port on loopback, no usage report leaves the machine.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

try:
    import ray
    import ray.data  # noqa: F401
except ImportError:
    if os.environ.get("MEDLENS_REQUIRE_RAY") == "1":
        raise
    pytest.skip('Ray is not installed (pip install -e ".[scale]"); the Ray engine tests are skipped', allow_module_level=True)

import psutil  # a dependency of Ray

from engine.batch import LocalEngine, RunOptions, TaskSpec, all_rows, plan_units, run_batch
from engine.batch.ray_engine import RayEngine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _batch import assert_each_unit_once, canonical, png_tree, real_tree  # noqa: E402
from _models import tiny_clip_folder  # noqa: E402

BATCH = 3  # units per batch: several batches, so both actors get work


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory):
    """HOME and Ray's auth token in pytest's folders for this module; Ray shut down at the end.

    The token is the value the engine gives a local Ray it starts (Ray's C++ side keeps the first token a
    process reads, so every Ray in this process must share it)."""
    from engine.batch.ray_engine import _process_token

    home = tmp_path_factory.mktemp("home")
    token = home / "token"
    token.write_text(_process_token())
    ray_tmp = tmp_path_factory.mktemp("rt")  # where Ray puts what it is not told to put elsewhere (e.g. the cluster address)
    (ray_tmp / "ray").mkdir()
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")}
    os.environ.update(HOME=str(home), RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(ray_tmp))
    yield home
    if ray.is_initialized():
        ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    assert not (home / ".ray").exists(), "Ray wrote into the home folder"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from engine.models import load_model

    folder = tiny_clip_folder(tmp_path_factory.mktemp("tiny_clip") / "model")
    load_model(f"local-dir:{folder}")  # as workers load it (see test_batch.py)
    return f"local-dir:{folder}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    from conftest import SHARED_DATA

    return real_tree(tmp_path_factory.mktemp("archive") / "tree", SHARED_DATA if SHARED_DATA.is_dir() else None)


@pytest.fixture(scope="module")
def local_rows(tiny, tree, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("local") / "out"
    # one torch thread, as each Ray actor below has: the encoder's float sums depend on the thread count
    run_batch(
        TaskSpec("label", tiny, {"labels": ["chest", "head", "abdomen"]}),
        [str(tree)],
        LocalEngine(threads=1),
        RunOptions(out=str(out), batch_units=BATCH, progress=False),
    )
    return all_rows(out)


def _spec(tiny: str) -> TaskSpec:
    return TaskSpec("label", tiny, {"labels": ["chest", "head", "abdomen"]})


def _ray_processes() -> list[psutil.Process]:
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() in ("raylet", "gcs_server") or " ".join(proc.cmdline()).startswith("ray::") or "ray" in proc.name():
                out.append(proc)
        except psutil.Error:
            continue
    return out


def _listening_addresses(processes: list[psutil.Process]) -> set[str]:
    pids = {p.pid for p in processes}
    return {c.laddr.ip for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids}


def test_ray_gives_the_same_rows_as_local_on_loopback_only(ray_home, tiny, tree, local_rows, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")  # no token configured: the engine makes its own, outside HOME
    seen: dict[str, set[str]] = {}

    def while_running(done: int, total: int) -> None:
        if not seen:
            seen["listening"] = _listening_addresses(_ray_processes())

    out = tmp_path / "ray"
    engine = RayEngine(workers=2, threads=1, temp_dir=str(tmp_path_factory.mktemp("r")))
    # as the CLI does: Ray starts on a thread while the tree is scanned; that thread must outlive its start (Ray's
    # services die with the thread that started them), so the job runs only after the start has fully finished
    engine.start_in_background()
    assert engine._ready.wait(120)
    summary = run_batch(
        _spec(tiny),
        [str(tree)],
        engine,
        RunOptions(out=str(out), batch_units=BATCH, progress=False),
        on_batch=while_running,
    )
    assert summary["complete"] and summary["engine"].startswith("ray, a local Ray (loopback only), 2 actor(s)")
    rows = all_rows(out)
    assert_each_unit_once(rows, {u.fingerprint for u in plan_units([str(tree)])})
    assert canonical(rows) == canonical(local_rows)  # identical rows, order aside
    assert sum(r["status"] == "error" for r in rows) >= 7  # the bad files are error rows on Ray too
    assert seen["listening"] and seen["listening"] <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, seen
    assert not ray.is_initialized()  # the engine shut its Ray down
    assert not (ray_home / ".ray").exists()  # Ray 2.60 would have put its token there


def test_a_worker_killed_mid_run_the_job_completes(ray_home, tiny, tmp_path, tmp_path_factory):
    images = png_tree(tmp_path / "images", 24)
    killed: list[int] = []

    def kill_a_worker(done: int, total: int) -> None:
        if killed:
            return
        workers = [p for p in _ray_processes() if "MedLensBatchWorker" in " ".join(p.cmdline())]
        assert workers, [" ".join(p.cmdline())[:80] for p in _ray_processes()]
        killed.append(workers[0].pid)
        assert done < total  # mid-run
        os.kill(workers[0].pid, signal.SIGKILL)

    out = tmp_path / "out"
    summary = run_batch(
        _spec(tiny),
        [str(images)],
        RayEngine(workers=2, temp_dir=str(tmp_path_factory.mktemp("r"))),
        RunOptions(out=str(out), batch_units=1, progress=False),
        on_batch=kill_a_worker,
    )
    assert killed and not psutil.pid_exists(killed[0])
    assert summary["complete"] and summary["totals"]["ok"] == 24
    assert_each_unit_once(all_rows(out), {u.fingerprint for u in plan_units([str(images)])})


def test_a_two_node_cluster_on_this_machine_runs_the_same_job(ray_home, tiny, tree, local_rows, tmp_path_factory):
    from ray.cluster_utils import Cluster

    temp = tmp_path_factory.mktemp("r")  # short: Ray's socket paths must stay within 107 characters
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": str(temp), "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, temp_dir=str(temp))
        out = tmp_path_factory.mktemp("cluster") / "out"
        summary = run_batch(
            _spec(tiny),
            [str(tree)],
            RayEngine(workers=2, threads=1, address=cluster.address),
            RunOptions(out=str(out), batch_units=BATCH, progress=False),
        )
        assert summary["complete"] and summary["run"]["nodes"] == 2, summary["run"]
        assert canonical(all_rows(out)) == canonical(local_rows)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
