"""Images to the browser without touching Gradio's file cache.

Design decision: every file in Gradio's cache is served by URL to anyone, and
a numpy array given to gr.Image is written there as a PNG. Views of a
patient's scan must not be, so a view travels inside the event's response as
a PNG `data:` URL in an <img> of a gr.HTML component (checked: Gradio 6
renders it; the browser test looks at the page). PNG keeps the pixels exact.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image


def png_data_url(image: np.ndarray | Image.Image) -> str:
    """A `data:image/png;base64,...` URL of an RGB/grey uint8 image."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)  # level 1: ~4x faster than 6, ~10% bigger
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def view_html(image: np.ndarray | Image.Image | None, title: str, caption: str = "") -> str:
    """One view as HTML: a titled <img> that scales to its column, or a placeholder."""
    title_html = html.escape(title)
    if image is None:
        body = f'<div class="ml-empty">{html.escape(caption) or "no scan loaded"}</div>'
    else:
        body = (
            f'<img class="ml-img" alt="{title_html} view" src="{png_data_url(image)}" '
            'style="width:100%;height:auto;display:block;background:#000;" />'
        )
        if caption:
            body += f'<div class="ml-caption">{html.escape(caption)}</div>'
    return f'<figure class="ml-view" data-plane="{title_html.lower()}"><figcaption>{title_html}</figcaption>{body}</figure>'


CSS = """
.ml-view { margin: 0; }
.ml-view figcaption { font-weight: 600; margin-bottom: 4px; }
.ml-view .ml-empty { aspect-ratio: 1 / 1; background: #111; color: #888; display: flex;
  align-items: center; justify-content: center; }
.ml-view .ml-caption { font-size: 0.85em; color: #888; margin-top: 2px; }
#ml-model-view .ml-img { image-rendering: pixelated; max-width: 256px; }
#ml-panels { margin-top: 4px; }
"""
