"""Who acts in each Gradio event, what they may do, and the audit line of it.

Design decisions
- Identity comes from the request, never from a value the browser sends:
  Gradio's password login sets `request.username`; Hugging Face sign-in
  leaves its profile in the signed session cookie (`hf:NAME`, so it cannot
  collide with a password user); a request to a server that listens on
  loopback only, without login, share link or Space, is the single local
  user (`local`, who shares the library with the CLI, as before). Anyone
  else is `anonymous`.
- One decorator, `acting(action, library=...)`, under `handlers.guarded`
  on every event that touches a scan: it resolves the identity, refuses
  anonymous visitors (always for library events; for the others unless
  MEDLENS_ALLOW_ANONYMOUS is on), and writes one audit line per event
  (engine.audit.recorded: `ok`, `refused` for a gr.Error message, `denied`,
  or `error:<class>`). The handler reads the library owner with `owner()`
  and adds the scan hash and model to the line with `entry()`. `owner()`
  outside an `acting` event raises: a library handler that forgot the
  decorator fails in every test instead of falling back to somebody's
  library.
- The decorator adds a `request: gr.Request` parameter to the handler's
  signature (Gradio fills it; it is not part of the API's parameters), so
  the handlers keep their plain-value signatures for direct calls in tests,
  where no request means the local user.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from engine import audit, settings
from engine.auth import ANONYMOUS, LOCAL, is_loopback, on_space


@dataclass(frozen=True)
class Identity:
    name: str  # audit name: a login, hf:NAME, local or anonymous

    @property
    def anonymous(self) -> bool:
        return self.name == ANONYMOUS


LOCAL_USER = Identity(LOCAL)
ANONYMOUS_USER = Identity(ANONYMOUS)
SIGN_IN = "Sign in first: this shared MedLens server needs a login for that."
SIGN_IN_LIBRARY = "Sign in to use the library: on a shared server each user has their own library."
NO_IDENTITY = "a library handler ran outside app.access.acting (it would not know whose library to use)"

_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("medlens_identity", default=None)
_entry: contextvars.ContextVar[audit.Entry | None] = contextvars.ContextVar("medlens_audit_entry", default=None)


# --------------------------------------------------------------------------- identity
def _underlying(request: Any) -> Any:
    return getattr(request, "request", None)


def _oauth_username(request: Any) -> str | None:
    """The Hugging Face username in the request's signed session (Space OAuth), if signed in and not expired."""
    scope = getattr(_underlying(request), "scope", None)
    session = scope.get("session") if isinstance(scope, dict) else None
    info = session.get("oauth_info") if isinstance(session, dict) else None
    if not isinstance(info, dict):
        return None
    expires = info.get("expires_at")
    if expires is not None and float(expires) < time.time():
        return None
    name = (info.get("userinfo") or {}).get("preferred_username")
    return str(name) if name else None


def _local_server(request: Any) -> bool:
    """Does the request reach a server only this machine can reach, without any login?"""
    blocks = getattr(getattr(_underlying(request), "app", None), "blocks", None)
    if blocks is None or on_space():
        return False
    if getattr(blocks, "auth", None) or getattr(blocks, "expects_oauth", False) or getattr(blocks, "share", False):
        return False
    return is_loopback(getattr(blocks, "server_name", None))


def identify(request: Any) -> Identity:
    """The identity behind a Gradio request (None: a direct call in Python, the caller's or the local user)."""
    if request is None:
        return _identity.get() or LOCAL_USER
    name = getattr(request, "username", None)
    if name:
        return Identity(str(name))
    hf = _oauth_username(request)
    if hf:
        return Identity(f"hf:{hf}")
    return LOCAL_USER if _local_server(request) else ANONYMOUS_USER


def current() -> Identity:
    identity = _identity.get()
    if identity is None:
        raise RuntimeError(NO_IDENTITY)
    return identity


def owner() -> str:
    """The library owner of the event running now (raises outside `acting`; gr.Error for anonymous visitors)."""
    identity = current()
    if identity.anonymous:
        raise gr.Error(SIGN_IN_LIBRARY, print_exception=False)
    return identity.name


def entry() -> audit.Entry:
    """The audit line of the event running now, to add its scans, model, results and detail (a scratch one outside)."""
    return _entry.get() or audit.Entry(action="none", user=LOCAL)


# --------------------------------------------------------------------------- the decorator
def _with_request(fn: Callable) -> inspect.Signature:
    sig = inspect.signature(fn)
    extra = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request)
    return sig.replace(parameters=[*sig.parameters.values(), extra])


def acting(
    action: str | None, *, library: bool = False, on_denied: Callable[[dict[str, Any]], None] | None = None
) -> Callable[[Callable], Callable]:
    """Decorate an event handler: identity, the anonymous rule, one audit line (`action` None: none).

    on_denied: called with the handler's arguments (by name) when the visitor is refused, e.g. to
    delete the files they uploaded.
    """

    def decorate(fn: Callable) -> Callable:
        signature = _with_request(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            identity = identify(bound.arguments.pop("request", None))
            token = _identity.set(identity)
            try:
                with audit.acting_as(identity.name):  # records written deep inside (exports, pushes) name this user
                    return _act(identity, action, library, on_denied, fn, bound)
            finally:
                _identity.reset(token)

        wrapper.__signature__ = signature  # type: ignore[attr-defined]  # Gradio sees (and fills) `request`
        wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "request": gr.Request}
        return wrapper

    return decorate


def _act(
    identity: Identity,
    action: str | None,
    library: bool,
    on_denied: Callable[[dict[str, Any]], None] | None,
    fn: Callable,
    bound: inspect.BoundArguments,
) -> Any:
    """The anonymous rule, then the handler (with its audit line unless `action` is None)."""
    if identity.anonymous and (library or not settings.ALLOW_ANONYMOUS.get()):
        if on_denied is not None:
            on_denied(dict(bound.arguments))
        if action is not None:
            audit.record(action, user=identity.name, outcome=audit.DENIED)
        raise gr.Error(SIGN_IN_LIBRARY if library else SIGN_IN, print_exception=False)
    if action is None:
        return fn(*bound.args, **bound.kwargs)
    return _recorded(action, identity, fn, bound)


def _recorded(action: str, identity: Identity, fn: Callable, bound: inspect.BoundArguments) -> Any:
    with audit.recorded(action, user=identity.name) as line:
        token = _entry.set(line)
        try:
            return fn(*bound.args, **bound.kwargs)
        except gr.Error:
            line.outcome = audit.REFUSED  # a message to the user (bad input, not found, not allowed)
            raise
        finally:
            _entry.reset(token)
