"""engine.auth: scrypt hashes, the users file and MEDLENS_USERS, `medlens user`, and which login a server runs with."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import sys

import pytest

from engine.auth import passwords, server, users
from engine.auth.passwords import PasswordError, hash_password, parse_hash, verify_password
from engine.auth.users import LiveUsers, UsersError, load_users, set_user
from engine.cli import main

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password(PASSWORD)


# --------------------------------------------------------------------------- hashes
def test_hash_round_trip_salted_and_never_plain(stored):
    assert stored.startswith("scrypt$32768$8$1$") and PASSWORD not in stored
    assert verify_password(PASSWORD, parse_hash(stored))
    assert not verify_password(PASSWORD + "x", parse_hash(stored))
    assert not verify_password(PASSWORD, None)  # unknown user: same work, always False
    assert hash_password(PASSWORD) != stored  # a fresh salt per hash
    assert stored.split("$")[-1] not in repr(parse_hash(stored)) and stored.split("$")[-2] not in repr(parse_hash(stored))


@pytest.mark.parametrize(
    "bad",
    [
        PASSWORD,
        "pbkdf2$1$x$y",
        "scrypt$3$8$1$AAAAAAAAAAA=$" + "A" * 44,
        "scrypt$1048577$8$1$AAAAAAAAAAA=$" + "A" * 44,
        "scrypt$16384$8$1$!!$??",
    ],
)
def test_plain_text_and_damaged_hashes_are_refused(bad):
    with pytest.raises(PasswordError) as info:
        parse_hash(bad)
    assert PASSWORD not in str(info.value)


def test_short_password_is_refused():
    with pytest.raises(PasswordError, match="at least 8"):
        hash_password("short")


# --------------------------------------------------------------------------- users file and environment
def test_users_file_text_and_json(tmp_path, monkeypatch, stored):
    text = tmp_path / "users.txt"
    text.write_text(f"# team\n\nalice:{stored}\n bob : {stored}\n")
    monkeypatch.setenv("MEDLENS_AUTH_FILE", str(text))
    store = load_users()
    assert set(store.hashes) == {"alice", "bob"} and store.verify("bob", PASSWORD) and not store.verify("carol", PASSWORD)
    js = tmp_path / "users.json"
    js.write_text(json.dumps({"users": {"carol": stored}}))
    monkeypatch.setenv("MEDLENS_AUTH_FILE", str(js))
    assert set(load_users().hashes) == {"carol"}


def test_environment_users_merge_with_the_file(tmp_path, monkeypatch, stored):
    monkeypatch.setenv("MEDLENS_USERS", f"dana:{stored}, eve:{stored}")
    assert set(load_users().hashes) == {"dana", "eve"}
    file = tmp_path / "u.txt"
    file.write_text(f"dana:{stored}\n")
    monkeypatch.setenv("MEDLENS_AUTH_FILE", str(file))
    with pytest.raises(UsersError, match="defined twice"):
        load_users()


def test_no_login_unless_configured(monkeypatch):
    assert load_users() is None and server.login_mode() == server.NONE


@pytest.mark.parametrize(
    "content, message",
    [
        (f"alice {PASSWORD}\n", r"u.txt:1: expected NAME:HASH"),
        (f"alice:{PASSWORD}\n", "plain-text passwords are refused"),
        ("local:{h}\n", "reserved"),
        ("has space:{h}\n", "a user name is"),
        ("# nobody\n", "lists no user"),
        ('{"alice": 3}', "expected"),
    ],
)
def test_bad_users_file_says_where_without_quoting_secrets(tmp_path, monkeypatch, stored, content, message):
    file = tmp_path / "u.txt"
    file.write_text(content.replace("{h}", stored))
    monkeypatch.setenv("MEDLENS_AUTH_FILE", str(file))
    with pytest.raises(UsersError, match=message) as info:
        load_users()
    assert PASSWORD not in str(info.value) and stored not in str(info.value)


def test_missing_users_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLENS_AUTH_FILE", str(tmp_path / "none.txt"))
    with pytest.raises(UsersError, match="medlens user add"):
        load_users()


def test_set_user_writes_0600_atomically_and_keeps_comments(tmp_path):
    file = tmp_path / "conf" / "users.txt"
    assert set_user(file, "alice", PASSWORD) is True
    assert stat.S_IMODE(file.stat().st_mode) == 0o600 and stat.S_IMODE(file.parent.stat().st_mode) == 0o700
    with pytest.raises(UsersError, match="already exists"):
        set_user(file, "alice", "another password")
    file.write_text(file.read_text() + "# a comment kept\n")
    assert set_user(file, "alice", "another password", replace=True) is False
    text = file.read_text()
    assert "# a comment kept" in text and PASSWORD not in text and text.count("alice:") == 1
    assert [p.name for p in file.parent.iterdir()] == ["users.txt"]  # no temp file left behind
    users.remove_user(file, "alice")
    assert "alice" not in file.read_text()


def test_live_users_reread_a_changed_file_and_fail_closed(tmp_path, monkeypatch, stored):
    file = tmp_path / "u.txt"
    file.write_text(f"alice:{stored}\n")
    monkeypatch.setenv("MEDLENS_AUTH_FILE", str(file))
    live = LiveUsers(load_users())
    assert live.verify("alice", PASSWORD) and not live.verify("bob", PASSWORD)
    file.write_text(f"alice:{stored}\nbob:{stored}\n")
    os.utime(file, ns=(1, 2))  # a new mtime even on coarse file-system clocks
    assert live.verify("bob", PASSWORD)
    file.write_text("broken line\n")
    os.utime(file, ns=(3, 4))
    assert not live.verify("alice", PASSWORD)  # a file that stops parsing lets nobody in


def test_nothing_secret_is_logged(tmp_path, monkeypatch, stored, caplog):
    file = tmp_path / "u.txt"
    file.write_text(f"alice:{stored}\n")
    file.chmod(0o644)  # too open: reported, by path only
    monkeypatch.setenv("MEDLENS_AUTH_FILE", str(file))
    with caplog.at_level(logging.DEBUG):
        live = LiveUsers(load_users())
        live.verify("alice", PASSWORD)
        live.verify("alice", "wrong password")
    assert "chmod 600" in caplog.text
    assert PASSWORD not in caplog.text and stored not in caplog.text and stored.split("$")[-1] not in caplog.text


# --------------------------------------------------------------------------- medlens user
def _run(capsys, monkeypatch, argv, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_cli_user_add_list_hash_remove(capsys, monkeypatch, tmp_path):
    file = tmp_path / "users.txt"
    code, out, err = _run(capsys, monkeypatch, ["user", "add", "alice", "--file", str(file), "--password-stdin"], PASSWORD + "\n")
    assert code == 0, err
    assert "added user alice" in out and f"MEDLENS_AUTH_FILE={file}" in out and PASSWORD not in out
    assert stat.S_IMODE(file.stat().st_mode) == 0o600 and PASSWORD not in file.read_text()
    monkeypatch.setenv("MEDLENS_AUTH_FILE", str(file))
    assert load_users().verify("alice", PASSWORD)
    assert _run(capsys, monkeypatch, ["user", "list"])[1].split() == ["alice"]
    code, out, _ = _run(capsys, monkeypatch, ["user", "hash", "bob", "--password-stdin"], PASSWORD + "\n")
    name, _, stored = out.strip().partition(":")
    assert code == 0 and name == "bob" and verify_password(PASSWORD, parse_hash(stored))
    code, _, err = _run(capsys, monkeypatch, ["user", "add", "alice", "--password-stdin"], PASSWORD + "\n")
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    code, _, err = _run(capsys, monkeypatch, ["user", "add", "local", "--password-stdin"], PASSWORD + "\n")
    assert code == 2 and "reserved" in err
    code, _, err = _run(capsys, monkeypatch, ["user", "add", "carol", "--password-stdin"], "short\n")
    assert code == 2 and "at least 8" in err
    code, _, err = _run(capsys, monkeypatch, ["user", "add", "carol"], "")  # no terminal, no --password-stdin
    assert code == 2 and "--password-stdin" in err
    assert _run(capsys, monkeypatch, ["user", "remove", "alice"])[0] == 0
    assert _run(capsys, monkeypatch, ["user", "list"])[1] == ""


def test_cli_user_add_asks_twice_with_getpass(capsys, monkeypatch, tmp_path):
    import getpass

    answers = iter([PASSWORD, PASSWORD + "!"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    monkeypatch.setattr(sys, "stdin", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    code = main(["user", "add", "alice", "--file", str(tmp_path / "u.txt")])
    assert code == 2 and "differ" in capsys.readouterr().err and not (tmp_path / "u.txt").exists()


# --------------------------------------------------------------------------- the login plan
@pytest.mark.parametrize(
    "host, loopback",
    [
        (None, True),
        ("", True),
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("medlens.example.org", False),
    ],
)
def test_is_loopback(host, loopback):
    assert server.is_loopback(host) is loopback


def test_plan_refuses_an_open_server_without_login(monkeypatch, stored):
    assert server.plan_login("127.0.0.1").refusal() is None
    plan = server.plan_login("0.0.0.0")
    assert plan.mode == server.NONE and "refusing to serve 0.0.0.0" in plan.refusal() and "MEDLENS_ALLOW_ANONYMOUS" in plan.refusal()
    monkeypatch.setenv("MEDLENS_ALLOW_ANONYMOUS", "1")
    plan = server.plan_login("0.0.0.0")
    assert plan.refusal() is None and "WITHOUT LOGIN" in plan.warnings()[0]
    monkeypatch.setenv("MEDLENS_ALLOW_ANONYMOUS", "maybe")
    with pytest.raises(Exception, match="MEDLENS_ALLOW_ANONYMOUS"):
        server.plan_login("0.0.0.0")
    monkeypatch.delenv("MEDLENS_ALLOW_ANONYMOUS")
    monkeypatch.setenv("MEDLENS_USERS", f"alice:{stored}")
    plan = server.plan_login("0.0.0.0")
    assert plan.mode == server.PASSWORD and plan.refusal() is None and "HTTPS" in plan.warnings()[0]


def test_plan_on_a_space(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/medlens")
    plan = server.plan_login("0.0.0.0")
    assert plan.mode == server.NONE and "Hugging Face Space" in plan.refusal()
    plan = server.plan_login("127.0.0.1")  # a Space is shared wherever Gradio binds
    assert plan.refusal() is not None
    monkeypatch.setenv("OAUTH_CLIENT_ID", "abc")
    assert server.plan_login("0.0.0.0").mode == server.NONE  # not SYSTEM=spaces: Gradio would mock the sign-in
    monkeypatch.setenv("SYSTEM", "spaces")
    plan = server.plan_login("0.0.0.0")
    assert plan.mode == server.OAUTH and plan.refusal() is None and "Sign in with Hugging Face" in plan.line()


def test_scrypt_parameters_are_the_documented_ones():
    assert (passwords.N, passwords.R, passwords.P) == (2**15, 8, 1)
