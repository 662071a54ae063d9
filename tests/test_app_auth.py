"""Login and per-user libraries in the app (issue 16): over HTTP with gradio_client and two signed-in users,
through the UI handlers with a request, the anonymous-visitor rules, Hugging Face sign-in on a Space, and
the refusal to serve beyond loopback without login."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _app import running_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22"}


def _png(path: Path, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, tiny):
    """(url, demo): the app with password login for alice and bob, the tiny model, on loopback."""
    from engine.auth import hash_password

    users = ",".join(f"{name}:{hash_password(pw)}" for name, pw in PASSWORDS.items())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDLENS_USERS", users)
        with running_app(tmp_path_factory.mktemp("gradio_cache"), model=tiny) as (url, demo):
            yield url, demo


@pytest.fixture
def audit_log(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "audit.jsonl"
    monkeypatch.setenv("MEDLENS_AUDIT_LOG", str(path))
    return path


def _client(url: str, user: str | None = None, password: str | None = None):
    from gradio_client import Client

    auth = None if user is None else (user, password or PASSWORDS[user])
    return Client(url, auth=auth, verbose=False, download_files=False)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------- login
def test_unauthenticated_clients_are_refused(auth_server, audit_log):
    import httpx
    from gradio_client.exceptions import AuthenticationError

    url, _demo = auth_server
    with pytest.raises(AuthenticationError):
        _client(url)
    with pytest.raises(Exception, match="(?i)credentials|login|401"):
        _client(url, "alice", "wrong password")
    with pytest.raises(Exception, match="(?i)credentials|login|401"):
        _client(url, "mallory", PASSWORDS["alice"])
    # raw HTTP: no config, no API call, no queue without the login cookie
    for method, path in (
        ("GET", "config"),
        ("POST", "gradio_api/call/library_search"),
        ("POST", "gradio_api/queue/join"),
        ("GET", "gradio_api/info"),
    ):
        response = httpx.request(method, url + path, json={"data": []}, timeout=30)
        assert response.status_code in (401, 403), (path, response.status_code)
    client = _client(url, "alice")
    assert client.predict(api_name="/whoami") == "Signed in as **alice** · [sign out](/logout)"
    outcomes = [(r["user"], r["action"], r["outcome"]) for r in _records(audit_log)]
    assert ("alice", "login", "denied") in outcomes and ("anonymous", "login", "denied") in outcomes
    assert ("alice", "login", "ok") in outcomes
    text = audit_log.read_text()
    assert "mallory" not in text and PASSWORDS["alice"] not in text and "wrong password" not in text


def test_the_auth_callable_is_a_coroutine_function():
    """Gradio awaits coroutine functions; anything else whose result is a truthy coroutine would let everyone in."""
    import inspect

    from app.login import make_auth
    from engine.auth import LiveUsers, UserStore

    assert inspect.iscoroutinefunction(make_auth(LiveUsers(UserStore())))


# --------------------------------------------------------------------------- isolation over HTTP
def _gallery_ids(gallery) -> list[int]:
    return [int(item["caption"].rsplit("#", 1)[1]) for item in gallery]


def test_user_b_cannot_find_open_see_or_tag_user_as_scans(auth_server, tiny, tmp_path, library, audit_log):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from engine.library import connect, index_paths, tags
    from engine.zeroshot import resolve_model

    url, _demo = auth_server
    alice, bob = _client(url, "alice"), _client(url, "bob")
    # alice: one scan indexed on the server (it has a source, so it can be opened), one added from an upload and tagged
    server_side = _png(tmp_path / "server" / "ct_like.png", seed=1)
    (ct_id,) = index_paths([server_side], None, resolve_model(tiny), owner="alice").scan_ids
    upload = _png(tmp_path / "alice" / "case.png", seed=2)
    alice.predict([handle_file(str(upload))], api_name="/load_files")
    status, tagged, up_id, _parts, _labels = alice.predict(0, tiny, "Malignant", api_name="/library_tag_positive")
    assert "tagged **positive**" in status and tagged["positive_ids"] == [up_id]
    gallery, hits, status, _p, _l = alice.predict("a scan", False, None, tiny, "any", "any", "any", 12, api_name="/library_search")
    assert sorted(h["scan_id"] for h in hits) == sorted([ct_id, up_id]) and len(gallery) == 2

    # bob: nothing of alice's by search, by id (open, share), or by thumbnail
    gallery, hits, status, parts, labels = bob.predict("a scan", False, None, tiny, "any", "any", "any", 50, api_name="/library_search")
    assert hits == [] and gallery == [] and "No scan in the library is indexed" in status
    assert labels["choices"] == [["any", "any"]] or [c[0] if isinstance(c, list) else c for c in labels["choices"]] == ["any"]
    for guess in range(1, max(ct_id, up_id) + 3):
        with pytest.raises(AppError, match=f"There is no scan #{guess} in the library"):
            bob.predict(guess, api_name="/library_open")
        with pytest.raises(AppError, match=f"There is no scan #{guess} in the library"):
            bob.predict(guess, api_name="/library_share")
    with pytest.raises(AppError, match="no scan is tagged 'malignant'"):
        bob.predict("x", False, None, tiny, "any", "any", "malignant", 10, api_name="/library_search")
    status, _p, _l = bob.predict(api_name="/library_refresh")
    assert "Library: 0 scans" in status

    # bob loads the very same image and tags it negative: his own row, alice's tag untouched
    bob.predict([handle_file(str(upload))], api_name="/load_files")
    status, tagged, bob_id, _p, _l = bob.predict(0, tiny, "malignant", api_name="/library_tag_negative")
    assert bob_id not in (ct_id, up_id) and tagged == {"label": "malignant", "positive_ids": [], "negative_ids": [bob_id]}
    _g, hits, *_ = bob.predict("", True, 0, tiny, "any", "any", "any", 50, api_name="/library_search")
    assert all(h["scan_id"] == bob_id for h in hits)  # "like" his scan finds no scan of alice's
    with connect() as db:
        assert tags(db, "malignant", owner="alice") == ([up_id], [])
    status, _p, _l = alice.predict(api_name="/library_refresh")
    assert "Library: 2 scans" in status

    # alice shares the server-side scan: bob finds it (thumbnail included) and opens it; he cannot unshare it
    assert "is shared" in alice.predict(ct_id, api_name="/library_share")
    gallery, hits, *_ = bob.predict("a scan", False, None, tiny, "any", "any", "any", 50, api_name="/library_search")
    assert ct_id in [h["scan_id"] for h in hits] and up_id not in [h["scan_id"] for h in hits]
    assert ct_id in _gallery_ids(gallery) and all(g["image"]["url"].startswith("data:image/png") for g in gallery)
    out = bob.predict(ct_id, api_name="/library_open")
    assert any(isinstance(v, str) and f"Opened scan #{ct_id}" in v for v in out)
    with pytest.raises(AppError, match="only they can change"):
        bob.predict(ct_id, api_name="/library_unshare")
    with pytest.raises(AppError, match="There is no scan"):
        bob.predict(up_id, api_name="/library_open")  # sharing one scan shares nothing else
    # ... and unshares it: gone for bob again
    assert "private again" in alice.predict(ct_id, api_name="/library_unshare")
    with pytest.raises(AppError, match=f"There is no scan #{ct_id}"):
        bob.predict(ct_id, api_name="/library_open")

    records = _records(audit_log)
    users = {r["user"] for r in records if r["action"] != "login"}
    assert users == {"alice", "bob"}
    refused = [r for r in records if r["user"] == "bob" and r["action"] == "open" and r["outcome"] == "refused"]
    assert len(refused) >= max(ct_id, up_id) + 2
    shares = [(r["user"], r["outcome"], r["detail"].get("shared")) for r in records if r["action"] == "share" and r["outcome"] == "ok"]
    assert shares == [("alice", "ok", True), ("alice", "ok", False)]


# --------------------------------------------------------------------------- through the UI handlers
def test_ui_handlers_check_the_request_user(tiny, tmp_path, library):
    import gradio as gr

    from app.labels_panel import model_choices
    from app.library_tab import library_open, library_select, make_search, make_share, make_tag
    from app.handlers import ScanSession
    from engine.io import load
    from engine.library import connect, index_paths, tags
    from engine.zeroshot import resolve_model

    as_alice, as_bob = SimpleNamespace(username="alice"), SimpleNamespace(username="bob")
    path = _png(tmp_path / "a.png", seed=5)
    (sid,) = index_paths([path], None, resolve_model(tiny), owner="alice").scan_ids
    allowed = {v for _, v in model_choices(tiny)[0]}
    out = library_open(sid, request=as_alice)
    assert out["metadata"]["series"]["modality"] == "OTHER"
    with pytest.raises(gr.Error, match=f"no scan #{sid}"):
        library_open(sid, request=as_bob)
    with pytest.raises(gr.Error, match=f"no scan #{sid}"):
        library_select([sid], SimpleNamespace(index=0), request=as_bob)  # a clicked id is checked too
    with pytest.raises(gr.Error, match=f"no scan #{sid}"):
        make_share(True)(sid, request=as_bob)
    _g, hits, *_ = make_search(allowed)("x", False, None, None, tiny, "any", "any", "any", 10, request=as_bob)
    assert hits == []
    session = ScanSession(scans=load([str(path)]).scans)
    status, tagged, bob_id, *_ = make_tag(allowed, False)(session, 0, tiny, "nodule", request=as_bob)
    assert bob_id != sid
    with connect() as db:
        assert tags(db, "nodule", owner="alice") == ([], []) and tags(db, "nodule", owner="bob") == ([], [bob_id])
    # no request at all: a direct call in Python is the local user, who owns neither
    with pytest.raises(gr.Error, match=f"no scan #{sid}"):
        library_open(sid)


# --------------------------------------------------------------------------- anonymous visitors
def _request(server_name="127.0.0.1", session=None, share=False, auth=None, expects_oauth=False, username=None):
    blocks = SimpleNamespace(server_name=server_name, share=share, auth=auth, expects_oauth=expects_oauth)
    inner = SimpleNamespace(scope={"session": session or {}}, app=SimpleNamespace(blocks=blocks))
    return SimpleNamespace(username=username, request=inner)


def test_who_a_request_is(monkeypatch):
    from app.access import identify

    assert identify(_request()).name == "local"
    assert identify(_request("::1")).name == "local"
    assert identify(_request("0.0.0.0")).name == "anonymous"
    assert identify(_request(share=True)).name == "anonymous"  # a share link reaches a loopback server from anywhere
    assert identify(_request(expects_oauth=True)).name == "anonymous"
    assert identify(_request(username="carol")).name == "carol"
    signed = {"oauth_info": {"userinfo": {"preferred_username": "dana"}, "expires_at": time.time() + 60}}
    assert identify(_request("0.0.0.0", session=signed, expects_oauth=True)).name == "hf:dana"
    expired = {"oauth_info": {"userinfo": {"preferred_username": "dana"}, "expires_at": time.time() - 60}}
    assert identify(_request("0.0.0.0", session=expired, expects_oauth=True)).name == "anonymous"
    assert identify(SimpleNamespace(username=None, request=None)).name == "anonymous"  # nothing known: not local
    monkeypatch.setenv("SPACE_ID", "someone/medlens")
    assert identify(_request()).name == "anonymous"


def test_anonymous_visitors_get_no_library_and_by_default_nothing(tmp_path, library, audit_log, monkeypatch, tiny):
    import gradio as gr

    from app.handlers import load_files, upload_folder
    from app.library_tab import library_refresh, make_add

    stranger = _request("0.0.0.0")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    upload = _png(upload_folder() / "0123456789abcdef0123456789abcdef" / "x.png", seed=9)  # a private upload path (app.uploads)
    with pytest.raises(gr.Error, match="Sign in first"):
        load_files([str(upload)], request=stranger)
    assert not upload.exists()  # the refused upload is deleted all the same
    with pytest.raises(gr.Error, match="Sign in to use the library"):
        library_refresh(request=stranger)
    monkeypatch.setenv("MEDLENS_ALLOW_ANONYMOUS", "1")
    upload = _png(upload_folder() / "def456" / "x.png", seed=9)
    out = load_files([str(upload)], request=stranger)  # allowed to view ...
    with pytest.raises(gr.Error, match="Sign in to use the library"):
        make_add({tiny})(out["state"], 0, tiny, request=stranger)  # ... never to use a library
    assert not library.exists()
    outcomes = [(r["user"], r["action"], r["outcome"]) for r in _records(audit_log)]
    assert outcomes == [("anonymous", "load", "denied"), ("anonymous", "load", "ok"), ("anonymous", "add", "denied")]


def test_a_library_handler_without_an_identity_fails_loudly():
    from app.access import NO_IDENTITY, owner

    with pytest.raises(RuntimeError, match=re.escape(NO_IDENTITY)):
        owner()


# --------------------------------------------------------------------------- start-up
def _run_app(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDLENS_AUTH", "MEDLENS_USERS", "MEDLENS_ALLOW", "SPACE_", "OAUTH_"))}
    env.update({"GRADIO_SERVER_PORT": "0", **env_extra})
    return subprocess.run([sys.executable, "app.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra", [{"GRADIO_SERVER_NAME": "0.0.0.0"}, {"GRADIO_SERVER_NAME": "127.0.0.1", "SPACE_ID": "x/medlens"}])
def test_a_server_open_beyond_loopback_without_login_refuses_to_start(extra):
    """`python app.py` exits 2 with one line before it binds anything (the check runs before launch)."""
    done = _run_app(extra)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "medlens: refusing to serve" in done.stderr and "MEDLENS_ALLOW_ANONYMOUS" in done.stderr
    assert "Traceback" not in done.stderr and "Running on" not in done.stdout


def test_the_anonymous_override_warns_loudly(monkeypatch, capsys, caplog):
    from app.login import login_kwargs

    monkeypatch.setenv("MEDLENS_ALLOW_ANONYMOUS", "1")
    assert login_kwargs({"server_name": "0.0.0.0"}) == {}  # no bind here: only the plan
    err = capsys.readouterr().err
    assert "WITHOUT LOGIN" in err and "WITHOUT LOGIN" in caplog.text


# --------------------------------------------------------------------------- Hugging Face sign-in on a Space
def _session_cookie(secret: str, session: dict) -> str:
    """A session cookie as Starlette's SessionMiddleware signs it (what Gradio's OAuth callback stores)."""
    import base64
    import hashlib

    from itsdangerous import TimestampSigner

    signer = TimestampSigner(hashlib.sha256((secret + "-v4").encode()).hexdigest())
    return signer.sign(base64.b64encode(json.dumps(session).encode())).decode()


def test_space_oauth_identifies_hf_users_and_refuses_visitors(tmp_path, monkeypatch, tiny, library, audit_log):
    import gradio.oauth as oauth
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    for name, value in {
        "SYSTEM": "spaces",
        "SPACE_ID": "someone/medlens",
        "OAUTH_CLIENT_ID": "client",
        "OAUTH_CLIENT_SECRET": "s3cret",
        "OAUTH_SCOPES": "openid profile",
        "OPENID_PROVIDER_URL": "http://127.0.0.1:9",
    }.items():
        monkeypatch.setenv(name, value)
        if hasattr(oauth, name):
            monkeypatch.setattr(oauth, name, value)  # gradio.oauth read them at import
    import gradio.http_server

    monkeypatch.setattr(gradio.http_server, "get_space", lambda: None)  # no Spaces hot-reloader (needs the Space's `spaces` package)
    with running_app(tmp_path / "cache", model=tiny) as (url, demo):
        assert demo.expects_oauth
        api = _client(url).view_api(return_format="dict", print_info=False)
        assert "/whoami" in api["named_endpoints"] and not api["unnamed_endpoints"]
        visitor = _client(url)
        png = _png(tmp_path / "v.png", seed=4)
        with pytest.raises(AppError, match="Sign in first"):
            visitor.predict([handle_file(str(png))], api_name="/load_files")
        assert "Not signed in" in visitor.predict(api_name="/whoami")
        from gradio_client import Client

        info = {
            "userinfo": {"preferred_username": "dana", "name": "Dana", "profile": "", "picture": ""},
            "expires_at": time.time() + 3600,
            "access_token": "t",
            "scope": "openid",
        }
        dana = Client(
            url, headers={"Cookie": f"session={_session_cookie('s3cret', {'oauth_info': info})}"}, verbose=False, download_files=False
        )
        assert dana.predict(api_name="/whoami").startswith("Signed in as **hf:dana**")
        dana.predict([handle_file(str(png))], api_name="/load_files")
        status, scan_id, *_ = dana.predict(0, tiny, api_name="/library_add")
        assert f"#{scan_id}" in status
        forged = _session_cookie("wrong secret", {"oauth_info": info})  # a cookie not signed by this server is ignored
        mallory = Client(url, headers={"Cookie": f"session={forged}"}, verbose=False, download_files=False)
        with pytest.raises(AppError, match="Sign in to use the library"):
            mallory.predict(scan_id, api_name="/library_open")
    users = [(r["user"], r["action"], r["outcome"]) for r in _records(audit_log)]
    assert ("anonymous", "load", "denied") in users and ("hf:dana", "add", "ok") in users and ("anonymous", "open", "denied") in users
