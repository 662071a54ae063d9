"""Component tweaks needed for privacy.

`UploadFile` is gr.File without a cache leak: Gradio 6.31's
`File._process_single_file` (type="filepath") opens a
`NamedTemporaryFile(delete=False)` in the cache for every uploaded file,
never writes, uses or deletes it, so each upload left an empty, untracked
file behind (even `delete_cache` does not sweep it). This subclass returns
the uploaded path directly, carrying the user's file name as `orig_name`
(the handler names its private copy after it, for messages; the path on
disk is neutral, see app.uploads). `is_template = True` is Gradio's own mechanism
(ClearButton, DuplicateButton) for a subclass that reuses its parent's
frontend, so the browser still renders it as a File.
"""

from __future__ import annotations

import gradio as gr
from gradio.data_classes import FileData
from gradio.utils import NamedString


class UploadFile(gr.File):
    is_template = True

    def _process_single_file(self, f: FileData) -> NamedString | bytes:
        if self.type != "filepath" or self.file_types:
            return super()._process_single_file(f)
        path = NamedString(f.path)
        path.orig_name = f.orig_name  # type: ignore[attr-defined]
        return path
