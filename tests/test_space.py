"""The Hugging Face Space path: a fresh venv from requirements.txt, then `python app.py` as the Space runs it.

Spaces install requirements.txt (not pyproject) on the README's python_version
and run app.py with SPACE_ID and SYSTEM=spaces set. This test does the same on
loopback: builds the venv with pip, starts app.py from the repository root
(the Space does not `pip install -e .`), waits for the page, loads a scan and
labels it through the API, and stops the server.

Slow (a venv of ~110 packages, built in minutes), so it runs only with
MEDLENS_REQUIRE_SPACE=1 (CI sets it) and is skipped with a notice otherwise.

Offline here: requirements.txt names the PyTorch CPU index (on the Space it
gives torch+cpu instead of the 3 GB CUDA build), which this machine cannot
reach. pip only warns for an unreachable index, but retries it 5 times for
every package (15 minutes of resolution, measured), so the test sets
PIP_RETRIES=0 when the index's host does not resolve; pip then takes the
torch/torchvision pair it finds (here 2.14.1/0.29.1 from the local disk).
Pinning the local torch 2.13.0+cpu wheel instead was tried and fails: PyPI's
torchvision for it is a CUDA build ("operator torchvision::nms does not
exist"); the Space gets a matched +cpu pair from the PyTorch index.
Build time (2 cores): 151 s at load 4-5, 296 s while three other test
suites ran; it is dominated by unpacking the CUDA torch stack (6.5 GB), and
pip's HTTP cache stays empty here (what it fetches from PyPI is not cached),
so a cache does not shorten it. The venv is deleted when the module ends.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _app import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.space, pytest.mark.slow]
BUILD_TIMEOUT_S = 1500
START_TIMEOUT_S = 300


def _space_python() -> str:
    """An interpreter of the README's python_version (the Space's), or a skip saying which is missing."""
    match = re.search(r'^python_version:\s*"?([0-9.]+)"?', (ROOT / "README.md").read_text(), re.MULTILINE)
    wanted = match.group(1) if match else "3.10"  # Spaces' default
    if ".".join(map(str, sys.version_info[:2])) == wanted:
        return sys.executable
    found = shutil.which(f"python{wanted}")
    if not found:
        pytest.skip(f"the Space runs Python {wanted} (README front matter); no python{wanted} here")
    return found


def _index_unreachable() -> bool:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"\s*--(?:extra-)?index-url\s+https?://([^/\s]+)", line)
        if m:
            try:
                socket.getaddrinfo(m.group(1), 443)
            except OSError:
                return True
    return False


def _build_venv(work: Path) -> Path:
    """`python -m venv` + `pip install -r requirements.txt`, as the Space's builder does."""
    venv = work / "venv"
    subprocess.run([_space_python(), "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_PROGRESS_BAR"] = "off"
    if _index_unreachable():
        env["PIP_RETRIES"] = "0"  # pip warns and goes on without the index; 5 retries per package cost ~15 min
    # --no-compile: byte-compiling torch's thousands of modules is build time the test does not need
    command = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", "-r", str(ROOT / "requirements.txt")]
    start = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    took = time.monotonic() - start
    assert done.returncode == 0, f"pip install -r requirements.txt failed after {took:.0f} s:\n{done.stderr[-3000:]}"
    print(f"\nSpace venv built from requirements.txt in {took:.0f} s", file=sys.stderr)
    return venv


@pytest.fixture(scope="module")
def space_venv():
    if os.environ.get("MEDLENS_REQUIRE_SPACE") != "1":
        pytest.skip("builds the Space's venv from requirements.txt (minutes): set MEDLENS_REQUIRE_SPACE=1 (CI does)")
    work = Path(tempfile.mkdtemp(prefix="medlens-space-"))  # not pytest's tmp: it keeps 3 runs of a multi-GB venv
    try:
        yield _build_venv(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def space_app(space_venv, tmp_path_factory):
    """`python app.py` from the repository root with the Space's variables, on a free loopback port."""
    home = tmp_path_factory.mktemp("space_home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("MEDLENS_")}
    env.update(
        SPACE_ID="medlens/medlens-ci",
        SYSTEM="spaces",
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        HOME=str(home),
        XDG_CACHE_HOME=str(home / "cache"),
        GRADIO_TEMP_DIR=str(home / "gradio"),
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_DISABLE_TELEMETRY="1",
        PATH=f"{space_venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        # what a Space with `hf_oauth: true` provides (sign-in itself needs huggingface.co, unreachable here);
        # anonymous use allowed so this test can load and label without a Hugging Face account
        OAUTH_CLIENT_ID="medlens-ci",
        OAUTH_CLIENT_SECRET="medlens-ci",
        OAUTH_SCOPES="openid profile",
        OPENID_PROVIDER_URL="https://huggingface.co",
        MEDLENS_ALLOW_ANONYMOUS="1",
    )
    log = open(home / "app.log", "w+")
    proc = subprocess.Popen([str(space_venv / "bin" / "python"), "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"app.py exited with status {proc.returncode} before serving:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"app.py did not answer on {url} within {START_TIMEOUT_S} s:\n{log.read()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_the_space_page_loads(space_app):
    with urllib.request.urlopen(space_app, timeout=30) as response:
        page = response.read().decode("utf-8", "replace")
    assert response.status == 200 and "gradio" in page.lower()
    with urllib.request.urlopen(space_app + "config", timeout=30) as response:
        assert "MedLens" in response.read().decode("utf-8", "replace")


def test_the_space_loads_and_labels_a_scan(space_app, tmp_path):
    import pydicom
    from gradio_client import Client, handle_file

    from engine.models import DEFAULT_MODEL

    client = Client(space_app, verbose=False, download_files=False)
    ct = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    loaded = client.predict([handle_file(str(ct))], api_name="/load_files")
    assert len(loaded[0]["choices"]) == 1 and "CT" in str(loaded[0]["choices"][0])  # the series picker names the scan
    _bar, _slices, result, _evidence, status = client.predict(
        0, 0, DEFAULT_MODEL, "auto", "liver\nlung\nbrain", "softmax", "mean", ["axial"], 4, api_name="/label_scan"
    )
    assert sorted(r["label"] for r in result["labels"]) == ["brain", "liver", "lung"], status
    assert sum(r["probability"] for r in result["labels"]) == pytest.approx(1.0, abs=1e-4)
