"""Which login a server runs with, decided once from its settings and where it listens.

Design decisions
- Three modes: `none` (a local single user: `python app.py` on 127.0.0.1,
  exactly as before), `password` (Gradio's login form and gradio_client's
  `auth=(user, password)`, checked against engine.auth.users) and `oauth`
  (Sign in with Hugging Face on a Space whose README says `hf_oauth: true`;
  the Space then provides OAUTH_CLIENT_ID). Password users win when both
  are configured: an operator who set them meant them.
- A server that listens beyond loopback (GRADIO_SERVER_NAME not 127.0.0.1,
  localhost or ::1; a Space always does) without login *refuses to start*
  unless MEDLENS_ALLOW_ANONYMOUS says so. The probe behind this issue saw a
  stranger open another user's CT and flip their tag on such a server; a
  warning scrolls past in a container log, a refusal cannot be missed, and
  the fix is one command (`medlens user add NAME`). With the override the
  server starts with a loud warning, and visitors without login still never
  reach a library (app.access).
- On a Space with OAuth, visitors who have not signed in are refused every
  action unless MEDLENS_ALLOW_ANONYMOUS is on; Gradio's OAuth, unlike its
  password login, does not close the page by itself.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from engine import settings
from engine.auth.users import UserStore, load_users

NONE, PASSWORD, OAUTH = "none", "password", "oauth"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str | None) -> bool:
    """Does binding `host` keep the server on this machine? (None/empty: Gradio's default, 127.0.0.1.)"""
    if host is None or not str(host).strip():
        return True
    name = str(host).strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a public interface


def on_space() -> bool:
    """Running on a Hugging Face Space (it sets SPACE_ID)."""
    return bool(os.environ.get("SPACE_ID", "").strip())


def space_oauth() -> bool:
    """A Space with `hf_oauth: true` in its README (the Space then sets OAUTH_CLIENT_ID).

    SYSTEM=spaces as well, as Gradio requires: elsewhere Gradio replaces the sign-in with a mock that
    needs the machine's own Hugging Face token, which a server must not act as.
    """
    return on_space() and os.environ.get("SYSTEM") == "spaces" and bool(os.environ.get("OAUTH_CLIENT_ID", "").strip())


def login_mode() -> str:
    """The login the app is built with: password when users are configured, else OAuth on a Space with it, else none."""
    from engine.auth.users import configured

    if configured():
        return PASSWORD
    return OAUTH if space_oauth() else NONE


@dataclass(frozen=True)
class LoginPlan:
    mode: str  # NONE, PASSWORD or OAUTH
    host: str  # the address the server binds
    users: UserStore | None  # password mode only
    allow_anonymous: bool

    @property
    def shared(self) -> bool:
        """Reachable by others: beyond loopback, or on a Space."""
        return not is_loopback(self.host) or on_space()

    def refusal(self) -> str | None:
        """Why the server must not start, or None."""
        if self.mode == NONE and self.shared and not self.allow_anonymous:
            where = "a Hugging Face Space" if on_space() else f"{self.host} (beyond this machine)"
            return (
                f"refusing to serve {where} without login: anyone who can reach it could use it. Turn login on "
                f"(`medlens user add NAME`, then {settings.AUTH_FILE.env}=<that file>; or {settings.USERS.env}; "
                f"or `hf_oauth: true` on a Space), listen on 127.0.0.1 only, or set {settings.ALLOW_ANONYMOUS.env}=1 "
                "to accept anonymous use (no library for visitors)"
            )
        return None

    def warnings(self) -> list[str]:
        out = []
        if self.mode == NONE and self.shared:
            out.append(
                f"WARNING: MedLens listens on {self.host} WITHOUT LOGIN ({settings.ALLOW_ANONYMOUS.env} is on): anyone who "
                "can reach this address can load, label and ask; the library is closed to them. Turn login on for a shared server."
            )
        if self.mode == PASSWORD and self.shared and not on_space():
            out.append(
                "Login is on; serve this address only behind HTTPS (a reverse proxy with TLS): the login form and the "
                "session cookie travel in clear text over plain http."
            )
        if self.mode == OAUTH and self.allow_anonymous:
            out.append("Visitors who have not signed in with Hugging Face may load, label and ask (never use the library).")
        return out

    def line(self) -> str:
        """One line for the console: how the server is protected."""
        if self.mode == PASSWORD:
            n = len(self.users or ())
            return f"MedLens login: password ({n} user{'s' if n != 1 else ''} from {', '.join(self.users.sources) if self.users else '?'})"
        if self.mode == OAUTH:
            return "MedLens login: Sign in with Hugging Face (OAuth)"
        return "MedLens login: off (single local user)" if not self.shared else "MedLens login: OFF (anonymous use allowed)"


def plan_login(host: str | None) -> LoginPlan:
    """The plan for a server binding `host` (reads the login settings; UsersError when they do not parse)."""
    mode = login_mode()
    users = load_users() if mode == PASSWORD else None
    return LoginPlan(mode=mode, host=str(host or "127.0.0.1"), users=users, allow_anonymous=bool(settings.ALLOW_ANONYMOUS.get()))
