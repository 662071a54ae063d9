"""Login for a shared MedLens server: password hashes, the users file, and which login a server runs with.

    from engine.auth import hash_password, load_users, plan_login
    store = load_users()                 # $MEDLENS_AUTH_FILE / $MEDLENS_USERS, or None (no login)
    store.verify("alice", password)      # constant time, scrypt

Modules: passwords (salted scrypt), users (files, environment, `medlens
user` writes), server (login mode, loopback check, refusal), cli (`medlens
user`). Nothing here imports gradio: app.access wires it into the app.
"""

from engine.auth.passwords import PasswordError, hash_password, verify_password
from engine.auth.server import NONE, OAUTH, PASSWORD, LoginPlan, is_loopback, login_mode, on_space, plan_login
from engine.auth.users import ANONYMOUS, LOCAL, LiveUsers, UsersError, UserStore, check_name, load_users

__all__ = [
    "ANONYMOUS",
    "LOCAL",
    "NONE",
    "OAUTH",
    "PASSWORD",
    "LiveUsers",
    "LoginPlan",
    "PasswordError",
    "UserStore",
    "UsersError",
    "check_name",
    "hash_password",
    "is_loopback",
    "load_users",
    "login_mode",
    "on_space",
    "plan_login",
    "verify_password",
]
