"""`medlens user add|remove|list|hash`: manage the app's login users.

Passwords are read with getpass (typed twice, never echoed) or, for
scripts, as one line from stdin with --password-stdin; never from the
command line, where they would sit in the shell history and in `ps`.
The file is written 0600 (engine.auth.users.set_user).
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from engine.auth.users import UsersError, check_name, default_file, names_in, remove_user, set_user
from engine.errors import MedLensError


def _password(args) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        if not password:
            raise MedLensError("--password-stdin: stdin gave no password")
        return password
    if not sys.stdin.isatty():
        raise MedLensError("no terminal to type the password in: pipe it with --password-stdin")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise MedLensError("the two passwords differ; nothing was changed")
    return first


def _file(args) -> Path:
    return Path(args.file).expanduser() if args.file else default_file()


def cmd_user_add(args) -> int:
    check_name(args.name)  # before asking for a password
    path = _file(args)
    new = set_user(path, args.name, _password(args), replace=args.replace)
    print(f"{'added' if new else 'changed the password of'} user {args.name} in {path} (mode 0600)")
    print(f"start the app with MEDLENS_AUTH_FILE={path} to require login")
    return 0


def cmd_user_remove(args) -> int:
    path = _file(args)
    remove_user(path, check_name(args.name))
    print(f"removed user {args.name} from {path}")
    return 0


def cmd_user_list(args) -> int:
    path = _file(args)
    if not path.exists():
        raise UsersError(f"no credentials file at {path}")
    for name in names_in(path):
        print(name)
    return 0


def cmd_user_hash(args) -> int:
    from engine.auth.passwords import hash_password

    name = check_name(args.name)
    print(f"{name}:{hash_password(_password(args))}")
    return 0


def register(sub) -> None:
    """Add `medlens user ...` to the CLI's subparsers."""
    p = sub.add_parser("user", help="manage the app's login users (hashed passwords in a 0600 file)")
    users = p.add_subparsers(dest="user_command", required=True)
    file_help = "credentials file (default: $MEDLENS_AUTH_FILE, else ~/.config/medlens/users.txt)"
    stdin_help = "read the password as one line from stdin instead of typing it twice"

    q = users.add_parser("add", help="add a user (asks for the password)")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--file", default=None, help=file_help)
    q.add_argument("--replace", action="store_true", help="change the password of an existing user")
    q.add_argument("--password-stdin", action="store_true", help=stdin_help)
    q.set_defaults(func=cmd_user_add)

    q = users.add_parser("remove", help="remove a user")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--file", default=None, help=file_help)
    q.set_defaults(func=cmd_user_remove)

    q = users.add_parser("list", help="list the user names (never their hashes)")
    q.add_argument("--file", default=None, help=file_help)
    q.set_defaults(func=cmd_user_list)

    q = users.add_parser("hash", help="print NAME:HASH for MEDLENS_USERS (e.g. a Space secret); writes nothing")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--password-stdin", action="store_true", help=stdin_help)
    q.set_defaults(func=cmd_user_hash)
