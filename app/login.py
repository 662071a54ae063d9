"""Login wiring of the app: Gradio's password login, Hugging Face sign-in on a Space, and the start-up check.

Design decisions
- The mode is engine.auth's (`login_mode()`): password users from
  MEDLENS_AUTH_FILE / MEDLENS_USERS, else OAuth on a Space with
  `hf_oauth: true`, else none. `build_demo` adds the "Sign in with Hugging
  Face" button in OAuth mode; `launch_kwargs` adds `auth=` in password mode
  and refuses a server that listens beyond loopback without login
  (engine.auth.server explains why), printing one line and exiting instead
  of a traceback.
- The password check is an `async def` that runs scrypt in a worker thread:
  Gradio awaits coroutine functions, so a burst of login attempts never
  stalls the event loop that serves everyone else. (A callable object with
  an async __call__ would not be recognised as a coroutine function, and
  its truthy coroutine would let everyone in: a plain function it is.)
- Each login attempt is one audit line (`login`, ok or denied); a name that
  is not a user is recorded as `anonymous`, because people type passwords
  into the name field.
- The credentials file is re-read when it changes (engine.auth.LiveUsers).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

import gradio as gr

from engine import audit
from engine.auth import ANONYMOUS, OAUTH, PASSWORD, LiveUsers, LoginPlan, login_mode, plan_login
from engine.errors import MedLensError

log = logging.getLogger("medlens.app")

AUTH_MESSAGE = "MedLens on a shared server: sign in with the account your administrator created for you."


def make_auth(live: LiveUsers) -> Callable:
    """The `auth=` callable of gr.Blocks.launch: constant-time scrypt check off the event loop, audited."""
    import anyio

    async def check_login(username: str, password: str) -> bool:
        ok = await anyio.to_thread.run_sync(live.verify, username, password)
        known = username in (live.current() or ())
        audit.record("login", user=username if known else ANONYMOUS, outcome=audit.OK if ok else audit.DENIED, detail={"known_user": known})
        return bool(ok)

    return check_login


def add_login_header(mode: str | None = None) -> None:
    """Inside build_demo's Blocks: the sign-in button (OAuth) and a line saying who is signed in."""
    mode = login_mode() if mode is None else mode
    if mode == OAUTH:
        gr.LoginButton(elem_id="ml-login")
    if mode != "none":
        who = gr.Markdown("", elem_id="ml-whoami")
        gr.on(triggers=None, fn=whoami, outputs=[who], api_name="whoami", show_progress="hidden")  # fires on page load


def whoami(request: gr.Request) -> str:
    """Who this browser is signed in as (and how to sign out)."""
    from app.access import identify

    identity = identify(request)
    if identity.anonymous:
        return "Not signed in: sign in to use MedLens on this shared server."
    return f"Signed in as **{identity.name}** · [sign out](/logout)"


def server_host(overrides: dict[str, Any]) -> str:
    """The address the server will bind: launch's server_name, else GRADIO_SERVER_NAME, else Gradio's 127.0.0.1."""
    return str(overrides.get("server_name") or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1")


def login_kwargs(overrides: dict[str, Any]) -> dict[str, Any]:
    """Launch options of the login plan; raises MedLensError when the server must not start."""
    plan: LoginPlan = plan_login(server_host(overrides))
    problem = plan.refusal()
    if problem:
        raise MedLensError(problem)
    print(plan.line(), file=sys.stderr)
    for warning in plan.warnings():
        log.warning(warning)
        print(warning, file=sys.stderr)
    if plan.mode == PASSWORD:
        return {"auth": make_auth(LiveUsers(plan.users)), "auth_message": AUTH_MESSAGE}
    return {}
