"""The "Library" tab: search the scan library by text or by the current scan, open hits, add scans, teach labels.

Design decisions
- UI only: each handler turns widget values into engine.library calls and
  opens its own connection (`connect()`, one per event; the library file is
  $MEDLENS_LIBRARY or the per-user default, the engine decides). Read events
  (search, open, refresh) never create a library file: with none there they
  say the library is empty. Write events (add, tag, fit) create it.
- The model is the one picked in the Scan tab's zero-shot panel (its
  dropdown is an input of every model event, checked against the same
  allow-list, so no typed string is ever loaded as a model). Embeddings of
  different models never mix: a search only sees scans indexed with it.
- Thumbnails reach the browser as PNG `data:` URLs inside the gallery's
  response (`ThumbnailGallery`), like the Scan tab's views: a numpy array or
  PIL image given to gr.Gallery is written into Gradio's cache, where any
  file can be fetched by URL. Nothing of the library is written there.
- Opening a hit: the scan is read again from its stored `source` through
  engine.io.load (the scan tab's loader) and the series whose content hash
  matches the library row is shown in the Scan tab (its gr.State and views
  are outputs of the event, through handlers.show_series) and that tab is
  selected. The path comes from the database, never from the browser: the
  user only gives a scan id. A PACS series (a sealed `dicomweb:` source) is
  retrieved again from the PACS. Scans added from the app have no source (the
  upload is deleted after reading), so they cannot be reopened; the
  message says so. Source paths are not shown in the tab: on a shared
  server they are another user's folder names, which often carry patient
  names.
- "Add current scan" / tagging store the de-identified Scan (the library
  keeps a thumbnail, the de-identified summary and the embedding) with
  source None. Tagging adds the scan first when it is not in the library
  (add_scan is idempotent by content hash).
- Searching "like the current scan": a scan that is already in the library
  is searched by its id (its stored embedding, and it is left out of its own
  results); otherwise it is embedded as indexing would.
- Trust (issue 14): each hit carries its out-of-distribution flag
  (engine.library.search); a flagged hit's caption starts with a warning
  and the status lists why.
- Model events (search, add, tag, fit, open) share the Scan tab's HEAVY
  concurrency id: one CPU-heavy job at a time on 2 cores.
- Whose library (issue 16): every event is decorated with
  `app.access.acting(..., library=True)` and passes `owner()`, the signed-in
  user (`local` without login on loopback), to every engine.library call,
  which selects in SQL only what that user may see: their own scans and
  those shared with everyone. Visitors without login get no library. An id
  typed or clicked is never trusted: opening, tagging, sharing and
  searching "like" a scan all go through the same rule, and a scan the user
  may not see is reported exactly like one that does not exist. Its owner
  can share a scan (or stop sharing it) by id; tags are per user (a tag on
  a shared scan is the tagger's own). Each event writes one audit line
  (app.access; the scan's content hash, never a name).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Callable

import gradio as gr

from app import handlers
from app.access import acting, entry, owner
from engine.scan import Modality

ANY = "any"
DEFAULT_K = 12
EMPTY_LIBRARY = "The library is empty: load a scan and press **Add current scan to library**, or index folders with `medlens index PATH`."
RANKING_WORDS = {
    "cosine": "cosine similarity",
    "bm25": "keyword match (BM25)",
    "rrf": "reciprocal rank fusion of the text, scan and keyword rankings",
}


# --------------------------------------------------------------------------- the gallery
class ThumbnailGallery(gr.Gallery):
    """gr.Gallery whose (PNG bytes, caption) items travel as data: URLs, never through Gradio's cache.

    `is_template = True` (Gradio's mechanism for a subclass reusing its
    parent's frontend, as app.components.UploadFile does): the browser
    renders an ordinary gallery. Other item types go to gr.Gallery as usual.
    """

    is_template = True

    def postprocess(self, value):
        from gradio.components.gallery import GalleryData, GalleryImage
        from gradio.data_classes import ImageData

        if not value or not all(isinstance(item, (tuple, list)) and isinstance(item[0], bytes) for item in value):
            return super().postprocess(value)
        return GalleryData(
            root=[
                GalleryImage(
                    image=ImageData(url=_png_url(png), mime_type="image/png"),  # path None: nothing to cache
                    caption=caption,
                )
                for png, caption in value
            ]
        )


def _png_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _placeholder_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (96, 96), 40).save(buf, format="PNG")
    return buf.getvalue()


NO_THUMBNAIL_PNG = _placeholder_png()


# --------------------------------------------------------------------------- helpers
def _library_exists() -> bool:
    from engine.library import library_path

    return library_path(None).is_file()


def _model(source: str | None, allowed: set[str]):
    from app.labels_panel import NO_MODEL_MESSAGE
    from engine.zeroshot import resolve_model

    if not source:
        raise gr.Error("No model chosen: " + NO_MODEL_MESSAGE.replace("**", ""), print_exception=False)
    if source not in allowed:
        from app.ask_panel import QFORMER_PREFIX

        if source.startswith(QFORMER_PREFIX):  # a Q-Former scores labels but has no shared embedding space to search in
            raise gr.Error(
                "The library searches with a CLIP model, and the model picked in the Scan tab's zero-shot labels is a "
                "Q-Former (questions and 3D labels). Pick a CLIP model there to index and search.",
                print_exception=False,
            )
        raise gr.Error("Choose a model from the list (Scan tab, zero-shot labels).", print_exception=False)
    return resolve_model(source)


def _current_scan(session, series, what: str):
    scan = handlers._scan(session, series)
    if scan is None:
        raise gr.Error(f"Load a scan on the Scan tab first, then {what}.", print_exception=False)
    return scan


def _label_text(label: str | None) -> str:
    from engine.library.teach import normalise_label

    if label is None or not str(label).strip():
        raise gr.Error("Type the label to teach first (e.g. 'pleural effusion').", print_exception=False)
    return normalise_label(label)


def _filter(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if not text or text.lower() == ANY else text


def _filter_updates(db) -> tuple[Any, Any]:
    """The filter dropdowns' choices: body parts of the scans this user may see, labels they taught."""
    from engine.library.store import facets

    parts, labels = facets(db, owner=owner())
    return gr.update(choices=[ANY] + parts), gr.update(choices=[ANY] + labels)


def _counts_line(db, model_id: str | None = None) -> str:
    from engine.library import counts

    n = counts(db, owner=owner())
    line = f"Library: {n['scans']} scan{'s' if n['scans'] != 1 else ''}"
    if model_id is not None:
        line += f", {n['embeddings'].get(model_id, 0)} searchable with model `{html.escape(model_id)}`"
    return line + "."


def _hit_row(hit) -> dict[str, Any]:
    """What the tab shows of a hit (no source path: see the module docstring)."""
    return {
        "scan_id": hit.scan_id,
        "score": round(float(hit.score), 6),
        "ranking": hit.ranking,
        "cosine": None if hit.cosine is None else round(float(hit.cosine), 6),
        "modality": hit.modality,
        "body_part": hit.body_part,
        **(hit.ood.to_dict() if hit.ood is not None else {"out_of_distribution": None}),
    }


# --------------------------------------------------------------------------- handlers
def make_search(allowed: set[str]) -> Callable:
    @handlers.guarded(title="Cannot search the library")
    @acting("search", library=True)
    def library_search(query, like, session, series, model, modality, body_part, label, k):
        """Hits for a text query and/or the current scan: gallery, hits (JSON), status, filter choices."""
        from engine.library import connect, counts, search
        from engine.library.store import get_scan, has_embedding, scan_id_by_hash

        query = (query or "").strip() or None
        if query is None and not like:
            raise gr.Error(
                "Nothing to search for: type a text query, or tick 'Similar to the scan on the Scan tab'.",
                print_exception=False,
            )
        like_scan = _current_scan(session, series, "search for similar scans") if like else None
        try:
            k = int(k or DEFAULT_K)
        except (TypeError, ValueError):
            raise gr.Error("The number of results must be a whole number.", print_exception=False) from None
        if k < 1:
            raise gr.Error("Ask for at least 1 result.", print_exception=False)
        if not _library_exists():
            return [], [], [], EMPTY_LIBRARY, gr.update(), gr.update()
        clip = _model(model, allowed)
        user, line = owner(), entry()
        line.model = clip
        if like_scan is not None:
            line.scan(like_scan)
        with connect(create=False) as db:
            like_arg: Any = like_scan
            if like_scan is not None:
                known = scan_id_by_hash(db, like_scan.content_hash, owner=user)
                if known is not None and has_embedding(db, known, clip.model_id):
                    like_arg = known  # its stored embedding; left out of its own results
            hits = search(
                db,
                clip,
                query,
                like=like_arg,
                k=k,
                modality=_filter(modality),
                body_part=_filter(body_part),
                label=_filter(label),
                owner=user,
            )
            line.results = [h.content_hash for h in hits if h.content_hash]
            items = []
            for hit in hits:
                row = get_scan(db, hit.scan_id, thumbnail=True, owner=user) or {}
                caption = f"{hit.score:.4f} · {hit.modality} · #{hit.scan_id}"
                if hit.ood is not None and hit.ood.out_of_distribution:
                    caption = "⚠ out of distribution · " + caption
                items.append((row.get("thumbnail") or NO_THUMBNAIL_PNG, caption))
            if hits:
                status = f"{len(hits)} hit{'s' if len(hits) != 1 else ''} · score: {RANKING_WORDS.get(hits[0].ranking, hits[0].ranking)}"
                status += " · click a thumbnail to open it in the viewer."
                flagged = [h for h in hits if h.ood is not None and h.ood.out_of_distribution]
                if flagged:
                    status += (
                        f"\n\n⚠️ **{len(flagged)} hit{'s' if len(flagged) != 1 else ''} out of distribution** (unlike the model's "
                        "training data: their similarity means little): "
                        + "; ".join(f"#{h.scan_id}: {html.escape('; '.join(h.ood.reasons))}" for h in flagged)
                    )
            elif not counts(db, owner=user)["embeddings"].get(clip.model_id):
                status = (
                    f"No scan in the library is indexed with model `{html.escape(clip.model_id)}`: add scans with it "
                    "(**Add current scan to library**, or `medlens index PATH --model ...`)."
                )
            else:
                status = "No match: the filters may exclude every scan."
            status += "\n\n" + _counts_line(db, clip.model_id)
            parts, labels = _filter_updates(db)
        return items, [_hit_row(h) for h in hits], [h.scan_id for h in hits], status, parts, labels

    return library_search


def _scan_id(value: Any) -> int:
    try:
        return int(str(value).strip().lstrip("#"))
    except (TypeError, ValueError):
        raise gr.Error("Give a library scan id (a whole number, as in '#12').", print_exception=False) from None


def _open(scan_id: Any) -> dict[str, Any]:
    """Every Scan-tab output for library scan `scan_id`, read again from its source."""
    import os

    from engine.io import load
    from engine.library import connect
    from engine.library.store import get_scan
    from engine.pacs.locator import is_locator

    sid = _scan_id(scan_id)
    if not _library_exists():
        raise gr.Error(EMPTY_LIBRARY.replace("**", ""), print_exception=False)
    with connect(create=False) as db:
        row = get_scan(db, sid, owner=owner())  # None too for a scan of someone else's that is not shared
    if row is None:
        raise gr.Error(f"There is no scan #{sid} in the library.", print_exception=False)
    entry().scan(row["content_hash"])
    source = row.get("source")
    if not source:
        raise gr.Error(
            f"Scan #{sid} was added from an upload: the library keeps its thumbnail and embedding, not its pixels. "
            "Upload the file again to view it.",
            print_exception=False,
        )
    if not is_locator(source) and not os.path.exists(source):
        raise gr.Error(
            f"The file or folder scan #{sid} was indexed from is no longer there (moved or deleted). "
            "Index it again from its new place (medlens index PATH).",
            print_exception=False,
        )
    result = load([source])  # a path from the library, never from the browser; never deleted
    match = [scan for scan in result.scans if scan.content_hash == row["content_hash"]]
    if not match:
        raise gr.Error(
            f"The file or folder scan #{sid} was indexed from has changed since (its pixels differ); index it again.",
            print_exception=False,
        )
    session = handlers.ScanSession(scans=match)
    out = handlers.show_series(session, 0, toasts=True)
    out["tabs"] = gr.Tabs(selected="scan")
    out["lib_status"] = f"Opened scan #{sid} ({html.escape(row['modality'])}) in the Scan tab."
    return out


@handlers.guarded(title="Cannot open this scan")
@acting("open", library=True)
def library_open(scan_id):
    """Open library scan `scan_id` in the Scan tab (read again from where it was indexed)."""
    return _open(scan_id)


@handlers.guarded(title="Cannot open this scan")
@acting("open", library=True)
def library_select(hit_ids, evt: gr.SelectData):
    """A gallery thumbnail was clicked: open that hit in the Scan tab."""
    index = getattr(evt, "index", None)
    if isinstance(index, (list, tuple)):
        index = index[0] if index else None
    if not hit_ids or index is None or not 0 <= int(index) < len(hit_ids):
        raise gr.Error("Search first, then click a result.", print_exception=False)
    out = _open(hit_ids[int(index)])
    out["open_id"] = hit_ids[int(index)]
    return out


def make_add(allowed: set[str]) -> Callable:
    @handlers.guarded(title="Cannot add this scan")
    @acting("add", library=True)
    def library_add(session, series, model):
        """Add the scan on the Scan tab to the library (embedded with the chosen model)."""
        from engine.library import add_scan, connect

        scan = _current_scan(session, series, "add it")
        clip = _model(model, allowed)
        entry().scan(scan).model = clip
        with connect() as db:
            scan_id, status = add_scan(db, scan, clip, source=None, owner=owner())
            entry().detail["status"] = status
            counts = _counts_line(db, clip.model_id)
            parts, labels = _filter_updates(db)
        what = {
            "added": f"Added as scan #{scan_id}.",
            "present": f"Already in the library as scan #{scan_id}.",
            "embedded": f"Already in the library as scan #{scan_id}; now searchable with this model too.",
        }[status]
        return f"{what}\n\n{counts}", scan_id, parts, labels

    return library_add


def make_tag(allowed: set[str], positive: bool) -> Callable:
    @handlers.guarded(title="Cannot tag this scan")
    @acting("tag", library=True)
    def library_tag(session, series, model, label):
        """Tag the scan on the Scan tab for `label` (adding it to the library first when needed)."""
        from engine.library import add_scan, connect, tag, tags

        label = _label_text(label)
        scan = _current_scan(session, series, "tag it")
        clip = _model(model, allowed)
        user = owner()
        entry().scan(scan).model = clip
        entry().detail["positive"] = bool(positive)
        with connect() as db:
            scan_id, _status = add_scan(db, scan, clip, source=None, owner=user)
            tag(db, [scan_id], label, positive, owner=user)
            pos, neg = tags(db, label, owner=user)
            parts, labels = _filter_updates(db)
        from engine.library.teach import MIN_PER_CLASS

        word = "positive" if positive else "negative"
        status = f"Scan #{scan_id} tagged **{word}** for '{html.escape(label)}'. Tagged so far: {len(pos)} positive, {len(neg)} negative"
        if len(pos) >= MIN_PER_CLASS and len(neg) >= MIN_PER_CLASS:
            status += "; press **Fit** to teach the label."
        else:
            status += f"; fitting needs at least {MIN_PER_CLASS} of each."
        return status, {"label": label, "positive_ids": pos, "negative_ids": neg}, scan_id, parts, labels

    library_tag.__name__ = f"library_tag_{'positive' if positive else 'negative'}"
    return library_tag


def make_teach(allowed: set[str]) -> Callable:
    @handlers.guarded(title="Cannot teach this label")
    @acting("teach", library=True)
    def library_teach(session, series, model, label):
        """Fit the label's linear probe on the tagged scans; show its summary (and P for the scan on screen)."""
        from engine.library import apply_probe, connect, embed_scan, fit_probe

        label = _label_text(label)
        clip = _model(model, allowed)
        scan = handlers._scan(session, series)
        user, line = owner(), entry()
        line.model = clip
        with connect() as db:
            probe = fit_probe(db, label, clip.model_id, owner=user)
            line.detail.update(positives=probe.n_pos, negatives=probe.n_neg)
            p_current = None
            if scan is not None:
                line.scan(scan)
                p_current = float(apply_probe(db, label, embed_scan(scan, clip)[0][None, :], clip.model_id, owner=user)[0])
            parts, labels = _filter_updates(db)
        m = probe.metrics
        status = (
            f"Taught '{html.escape(probe.label)}' (model `{html.escape(probe.model_id)}`): {probe.n_pos} positive, "
            f"{probe.n_neg} negative · training accuracy {m['train_accuracy']:.2f} · cross-validated balanced accuracy "
            f"{m['cv_balanced_accuracy']:.2f} ({m['cv_folds']}-fold). It is now a filter of the search."
        )
        summary = probe.summary()
        if p_current is not None:
            status += f"\n\nP('{html.escape(probe.label)}') for the scan on the Scan tab: **{p_current:.2f}**"
            summary["p_current_scan"] = round(p_current, 4)
        return status, summary, parts, labels

    return library_teach


def make_share(shared: bool) -> Callable:
    @handlers.guarded(title="Cannot change who sees this scan")
    @acting("share", library=True)
    def library_share(scan_id):
        """Share library scan `scan_id` (one of yours) with every signed-in user, or make it private again."""
        from engine.library import connect
        from engine.library.store import get_scan, share

        sid, user = _scan_id(scan_id), owner()
        missing = gr.Error(f"There is no scan #{sid} in the library.", print_exception=False)
        if not _library_exists():
            raise missing
        with connect(create=False) as db:
            row = get_scan(db, sid, owner=user)
            if row is None:
                raise missing
            entry().scan(row["content_hash"]).detail["shared"] = shared
            share(db, [sid], shared, owner=user)  # LibraryError (shown) when the scan is someone else's
        if shared:
            return f"Scan #{sid} is shared: every signed-in user can now find, open and tag it (their tags stay theirs)."
        return f"Scan #{sid} is private again: only you can find or open it."

    library_share.__name__ = "library_share" if shared else "library_unshare"
    return library_share


@handlers.guarded(title="Cannot read the library")
@acting(None, library=True)
def library_refresh():
    """The tab was opened: library size and the filter choices (body parts, taught labels)."""
    from engine.library import connect

    if not _library_exists():
        return EMPTY_LIBRARY, gr.update(), gr.update()
    with connect(create=False) as db:
        line = _counts_line(db)
        parts, labels = _filter_updates(db)
    return line, parts, labels


# --------------------------------------------------------------------------- layout and wiring
def _ordered(fn: Callable[..., dict[str, Any]], names: tuple[str, ...]) -> Callable[..., tuple]:
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        return tuple(out.get(name, gr.update()) for name in names)

    return wrapper


def build_library_tab(scan: dict[str, Any], tabs: gr.Tabs | None = None, model: str | None = None) -> dict[str, Any]:
    """Create the "Library" tab in the current gr.Tabs; `scan` holds the Scan tab's components.

    tabs: the gr.Tabs holding both tabs (opening a hit selects the Scan tab);
    model: the app's model source, as given to build_scan_tab (the allow-list).
    """
    from app.labels_panel import model_choices
    from app.scan_tab import HEAVY, SERIES_OUTPUTS

    choices, _value = model_choices(model)
    allowed = {v for _, v in choices}
    c: dict[str, Any] = {}
    with gr.Tab("Library", id="library", elem_id="ml-library-tab") as c["tab"]:
        c["hit_ids"] = gr.State([])
        gr.Markdown(
            "Search the scan library by words or by the scan on the Scan tab. Scans are embedded with the model "
            "picked in the Scan tab's zero-shot panel; only scans indexed with that model are found."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                c["query"] = gr.Textbox(label="Search text", placeholder="e.g. pleural effusion", elem_id="ml-lib-query")
                c["like"] = gr.Checkbox(label="Similar to the scan on the Scan tab", value=False, elem_id="ml-lib-like")
                c["modality"] = gr.Dropdown(
                    label="Modality", choices=[ANY] + [m.value for m in Modality], value=ANY, elem_id="ml-lib-modality"
                )
                c["body_part"] = gr.Dropdown(
                    label="Body part", choices=[ANY], value=ANY, allow_custom_value=True, elem_id="ml-lib-body-part"
                )
                c["label"] = gr.Dropdown(label="Taught label", choices=[ANY], value=ANY, allow_custom_value=True, elem_id="ml-lib-label")
                c["k"] = gr.Slider(label="Results", minimum=1, maximum=50, step=1, value=DEFAULT_K, elem_id="ml-lib-k")
                c["search"] = gr.Button("Search", variant="primary", elem_id="ml-lib-search")
                with gr.Row():
                    c["open_id"] = gr.Number(label="Scan id", precision=0, value=None, elem_id="ml-lib-open-id")
                    c["open"] = gr.Button("Open in viewer", elem_id="ml-lib-open")
                with gr.Row():
                    c["share"] = gr.Button("Share with all users", size="sm", elem_id="ml-lib-share")
                    c["unshare"] = gr.Button("Make private", size="sm", elem_id="ml-lib-unshare")
                c["add"] = gr.Button("Add current scan to library", elem_id="ml-lib-add")
                with gr.Accordion("Teach a label", open=False, elem_id="ml-lib-teach"):
                    c["teach_label"] = gr.Textbox(label="Label", placeholder="e.g. pleural effusion", elem_id="ml-lib-teach-label")
                    with gr.Row():
                        c["tag_pos"] = gr.Button("Current scan: positive", elem_id="ml-lib-tag-pos")
                        c["tag_neg"] = gr.Button("Current scan: negative", elem_id="ml-lib-tag-neg")
                    c["fit"] = gr.Button("Fit", variant="primary", elem_id="ml-lib-fit")
                    c["probe"] = gr.JSON(label="Probe / tags", elem_id="ml-lib-probe")
            with gr.Column(scale=4):
                c["lib_status"] = gr.Markdown("", label="library status", elem_id="ml-lib-status")
                c["gallery"] = ThumbnailGallery(
                    label="Results (score · modality · #id)",
                    columns=6,
                    height="auto",
                    object_fit="contain",
                    allow_preview=False,
                    buttons=[],
                    interactive=False,
                    elem_id="ml-lib-gallery",
                )
                with gr.Accordion("Results as JSON", open=False):
                    c["hits"] = gr.JSON(label="Hits", elem_id="ml-lib-hits")
    _wire(c, scan, tabs, allowed, HEAVY, SERIES_OUTPUTS)
    return c


def _wire(c, scan, tabs, allowed, heavy, series_outputs) -> None:
    heavy_kwargs = dict(concurrency_limit=1, concurrency_id=heavy)
    filters = [c["body_part"], c["label"]]
    gr.on(
        [c["search"].click, c["query"].submit],
        make_search(allowed),
        inputs=[c["query"], c["like"], scan["state"], scan["series"], scan["lp_model"], c["modality"], c["body_part"], c["label"], c["k"]],
        outputs=[c["gallery"], c["hits"], c["hit_ids"], c["lib_status"], *filters],
        api_name="library_search",
        **heavy_kwargs,
    )
    open_names = tuple(series_outputs) + (("tabs",) if tabs is not None else ()) + ("lib_status",)
    everything = {**scan, "lib_status": c["lib_status"], "tabs": tabs, "open_id": c["open_id"]}
    c["open"].click(
        _ordered(library_open, open_names),
        inputs=[c["open_id"]],
        outputs=[everything[n] for n in open_names],
        api_name="library_open",
        **heavy_kwargs,
    )
    select_names = open_names + ("open_id",)
    c["gallery"].select(
        _ordered(library_select, select_names),
        inputs=[c["hit_ids"]],
        outputs=[everything[n] for n in select_names],
        api_name="library_select",
        **heavy_kwargs,
    )
    c["add"].click(
        make_add(allowed),
        inputs=[scan["state"], scan["series"], scan["lp_model"]],
        outputs=[c["lib_status"], c["open_id"], *filters],
        api_name="library_add",
        **heavy_kwargs,
    )
    for positive, button in ((True, c["tag_pos"]), (False, c["tag_neg"])):
        fn = make_tag(allowed, positive)
        button.click(
            fn,
            inputs=[scan["state"], scan["series"], scan["lp_model"], c["teach_label"]],
            outputs=[c["lib_status"], c["probe"], c["open_id"], *filters],
            api_name=fn.__name__,
            **heavy_kwargs,
        )
    c["fit"].click(
        make_teach(allowed),
        inputs=[scan["state"], scan["series"], scan["lp_model"], c["teach_label"]],
        outputs=[c["lib_status"], c["probe"], *filters],
        api_name="library_teach",
        **heavy_kwargs,
    )
    for shared, button in ((True, c["share"]), (False, c["unshare"])):
        fn = make_share(shared)
        button.click(fn, inputs=[c["open_id"]], outputs=[c["lib_status"]], api_name=fn.__name__, show_progress="hidden")
    c["tab"].select(library_refresh, outputs=[c["lib_status"], *filters], api_name="library_refresh", show_progress="hidden")
