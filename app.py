"""MedLens web app: `python app.py` (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose where; MEDLENS_MODEL the model;
MEDLENS_AUTH_FILE / MEDLENS_USERS turn login on)."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from app import build_demo, serve  # noqa: E402  (the package app/, not this file)
from engine import settings  # noqa: E402

demo = build_demo(model=settings.MODEL.get())  # zero-shot model; the viewer works without one

if __name__ == "__main__":
    serve(demo)  # with login when configured; refuses to serve beyond loopback without it
