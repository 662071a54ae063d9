"""The PACS as one more source of scans, and the destination of results (DICOMweb).

    from engine.pacs import PacsClient, make_filter
    with PacsClient() as pacs:                     # MEDLENS_PACS_URL / _USER / _PASSWORD (or _TOKEN)
        studies = pacs.search(make_filter(patient_id="12345", modality="CT"))
    scans = engine.io.load(["dicomweb:1.2.3/4.5.6"]).scans   # a PACS series is a path

Modules: config (where the PACS is, credentials, TLS), client (QIDO-RS,
WADO-RS, STOW-RS over dicomweb-client, errors), query (filters and rows),
locator (`dicomweb:` paths, sealed for the library), retrieve (series ->
Scans in memory), origin (the identified context kept for writing back),
cli (`medlens pacs search`). Results are written by engine.results.

THE DE-IDENTIFICATION BOUNDARY (the rule every module here keeps)
1. The library, every cache and every log hold de-identified data only, as
   for files: a scan read from the PACS goes through the same reader and
   de-identification on ingest (engine.deid), the library stores its
   `dicomweb:` source sealed (engine.pacs.locator), and no message or log
   line carries a UID, a name or an ID read from the PACS.
2. Writing results back into the patient's study needs the real study and
   instance UIDs and the patient/study attributes. They are kept in memory
   only, in a PacsOrigin bound to the scan (`Scan.origin`) and to the
   server it came from, and used only to write to that same server
   (engine.results.push refuses any other). A PacsOrigin cannot be pickled.
3. Export to files, or to any other destination, is de-identified: patient
   and study attributes left empty, every UID replaced by the same salted
   mapping the library uses (engine.deid.map_uid), and the JSON result
   carries only de-identified values.
Search results (patient names and IDs included) are what the PACS returns
to the configured user; they are shown to that user and never stored.
"""

from engine.pacs.client import PacsClient, StoreReport
from engine.pacs.config import PacsConfig, config_from_settings, configured
from engine.pacs.errors import (
    LocatorError,
    NotAnImage,
    PacsAuthError,
    PacsConfigError,
    PacsError,
    PacsNotFound,
    PacsUnreachable,
    PartialRetrieve,
)
from engine.pacs.locator import Locator, is_locator, parse, storable
from engine.pacs.query import QueryError, QueryFilter, SeriesRow, StudyRow, make_filter, parse_query


__all__ = [
    "Locator",
    "LocatorError",
    "NotAnImage",
    "PacsAuthError",
    "PacsClient",
    "PacsConfig",
    "PacsConfigError",
    "PacsError",
    "PacsNotFound",
    "PacsUnreachable",
    "PartialRetrieve",
    "QueryError",
    "QueryFilter",
    "SeriesRow",
    "StoreReport",
    "StudyRow",
    "config_from_settings",
    "configured",
    "is_locator",
    "make_filter",
    "parse",
    "parse_query",
    "storable",
]
