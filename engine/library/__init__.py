"""The scan library: index scans, search them by text, by example and by keyword, teach labels.

    from engine.library import connect, index_paths, search
    report = index_paths(["/data/cases"], None, model)          # None: $MEDLENS_LIBRARY or the default file
    with connect() as db:                                        # one connection per request
        hits = search(db, model, "pleural effusion", k=10, modality="xray")

Modules: db (file, schema, migrations, connections, transactions), store
(rows, embeddings, thumbnails), vectors (exact top-k index, optional
faiss), indexing (files -> rows), search (vector + keyword + RRF), teach
(tags and linear probes). Nothing here imports gradio or training.

Owners: every function that reads or writes scans takes `owner=` (the
library user; default `local`, the CLI's and the single local user's); it
sees its own scans and shared ones, and writes only its own (see db's
docstring). `share(db, ids, True, owner=...)` shares scans of that owner.
"""

from engine.library.db import LibraryError, connect, default_library_path, library_path, write
from engine.library.indexing import IndexReport, add_scan, index_paths
from engine.library.search import Hit, SearchError, keyword_search, rrf, search
from engine.library.store import add_note, counts, embed_scan, get_scan, share, visible_ids
from engine.library.teach import Probe, TeachError, apply_probe, fit_probe, list_probes, load_probe, tag, tags, teach, untag
from engine.library.vectors import VectorIndex, index_for

__all__ = [
    "Hit",
    "IndexReport",
    "LibraryError",
    "Probe",
    "SearchError",
    "TeachError",
    "VectorIndex",
    "add_note",
    "add_scan",
    "apply_probe",
    "connect",
    "counts",
    "default_library_path",
    "embed_scan",
    "fit_probe",
    "get_scan",
    "index_for",
    "index_paths",
    "keyword_search",
    "library_path",
    "list_probes",
    "load_probe",
    "rrf",
    "search",
    "share",
    "tag",
    "tags",
    "teach",
    "untag",
    "visible_ids",
    "write",
]
