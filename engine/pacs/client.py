"""The DICOMweb client: QIDO-RS search, WADO-RS retrieve, STOW-RS store, every failure a clear PacsError.

Design decisions
- Built on `dicomweb-client` (requests underneath), one `requests.Session`
  per client carrying the credentials (basic auth or a bearer token) and
  the TLS verification setting (engine.pacs.config).
- Errors are translated here, once: connection refused / unknown host /
  timeout / TLS failure -> PacsUnreachable; 401 and 403 -> PacsAuthError;
  404 -> PacsNotFound; any other status -> PacsError with the status code.
  Messages name the server (its URL, which holds no credentials) and what
  was being done, never the request URL (it carries UIDs) or a header.
- dicomweb-client and urllib3 log each request URL (with study and series
  UIDs) at DEBUG level; their loggers are held at INFO/WARNING so no UID
  reaches a log even when an application logs at DEBUG.
- WADO-RS asks for `transfer-syntax=*`: the instances as stored. Without it
  Orthanc must transcode to Explicit VR Little Endian, which Debian's
  Orthanc cannot do for JPEG 2000 (HTTP 500); our readers decode every
  stored syntax themselves (engine.io.dicom).
- WADO-RS responses are streamed (`iter_series`, 4 MiB chunks) and each
  instance is parsed as soon as its part has arrived: reading the whole
  multipart body first (requests' default, 10 KiB reads) made a 300-slice
  series 3x slower (bench/pacs.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from engine.pacs.config import PacsConfig, config_from_settings
from engine.pacs.errors import PacsAuthError, PacsError, PacsNotFound, PacsUnreachable
from engine.pacs.query import SERIES_FIELDS, STUDY_FIELDS, QueryFilter, SeriesRow, StudyRow, series_row, study_row

AS_STORED = (("application/dicom", "*"),)  # WADO-RS media type: any transfer syntax, i.e. no transcoding
DEFAULT_LIMIT = 100  # studies per search
CHUNK = 4 << 20  # bytes per read of a streamed WADO-RS response
RETRIES = 3  # attempts per request (busy server: 429/503/504, or a connection error)


@dataclass
class StoreReport:
    """What a STOW-RS request stored."""

    server: str
    study_uid: str
    stored: list[str] = field(default_factory=list)  # SOP Instance UIDs the server accepted
    failed: list[str] = field(default_factory=list)  # SOP Instance UIDs it refused


def _quiet_library_logs() -> None:
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.INFO)  # its DEBUG lines are request URLs


class PacsClient:
    """One DICOMweb server (default: the one MEDLENS_PACS_* names)."""

    def __init__(self, config: PacsConfig | None = None):
        import requests
        from dicomweb_client.api import DICOMwebClient

        _quiet_library_logs()
        self.config = config or config_from_settings()
        session = requests.Session()
        session.verify = str(self.config.ca_bundle) if self.config.ca_bundle else True
        if self.config.token:
            session.headers["Authorization"] = f"Bearer {self.config.token}"
        elif self.config.user:
            session.auth = (self.config.user, self.config.password or "")
        session.headers["User-Agent"] = "MedLens"
        self._session = session
        try:
            self._web = DICOMwebClient(self.config.url, session=session, timeout=self.config.timeout, chunk_size=CHUNK)
        except ValueError as exc:
            raise PacsError(f"MEDLENS_PACS_URL cannot be used by the DICOMweb client: {exc}") from None
        # dicomweb-client retries every failed request (a refused connection too) 5 times, 1-16 s apart:
        # 30 s before "server down" is reported. Three tries 0.25-0.5 s apart ride out a restart all the same.
        self._web.set_http_retry_params(retry=True, max_attempts=RETRIES, wait_exponential_multiplier=250)

    @property
    def identity(self) -> str:
        return self.config.identity

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "PacsClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------- errors
    @contextlib.contextmanager
    def _request(self, what: str, not_found: str | None = None) -> Iterator[None]:
        import requests

        server = self.identity
        try:
            yield
        except requests.exceptions.SSLError:
            raise PacsUnreachable(
                f"the TLS certificate of the PACS at {server} could not be verified ({what}): if a hospital CA signs it, "
                "set MEDLENS_PACS_CA_BUNDLE to that CA's PEM file"
            ) from None
        except requests.exceptions.Timeout:
            raise PacsUnreachable(
                f"the PACS at {server} did not answer within {self.config.timeout:g} s ({what}); "
                "raise MEDLENS_PACS_TIMEOUT for very large series"
            ) from None
        except requests.exceptions.ConnectionError:
            raise PacsUnreachable(
                f"cannot reach the PACS at {server} ({what}): connection refused or host unknown; "
                "check MEDLENS_PACS_URL and that the server is running"
            ) from None
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 401:
                raise PacsAuthError(
                    f"the PACS at {server} refused the credentials (HTTP 401): check MEDLENS_PACS_USER and "
                    "MEDLENS_PACS_PASSWORD (or MEDLENS_PACS_TOKEN)"
                ) from None
            if status == 403:
                raise PacsAuthError(f"the PACS at {server} denied this user access (HTTP 403) while {what}") from None
            if status == 404:
                raise PacsNotFound(not_found or f"the PACS at {server} found nothing (HTTP 404) while {what}") from None
            raise PacsError(f"the PACS at {server} answered HTTP {status} while {what}") from None
        except requests.exceptions.RequestException as exc:
            raise PacsUnreachable(f"request to the PACS at {server} failed while {what} ({type(exc).__name__})") from None
        except (ValueError, KeyError, TypeError) as exc:  # malformed JSON or multipart from the server
            raise PacsError(f"the PACS at {server} sent an answer that cannot be read while {what} ({type(exc).__name__})") from None

    # ----------------------------------------------------------------------- QIDO-RS
    def check(self) -> int:
        """One small search: raises a PacsError when the server is unreachable or refuses us; returns the studies seen (0 or 1)."""
        with self._request("checking the connection"):
            return len(self._web.search_for_studies(limit=1))

    def search_studies(self, query: QueryFilter, limit: int = DEFAULT_LIMIT) -> list[StudyRow]:
        with self._request("searching for studies"):
            items = self._web.search_for_studies(search_filters=query.study_params(), fields=list(STUDY_FIELDS), limit=limit)
        return [row for row in (study_row(item) for item in items) if row.study_uid]

    def search_series(self, study_uid: str, query: QueryFilter | None = None) -> list[SeriesRow]:
        params = (query or QueryFilter()).series_params()
        with self._request("searching for series", not_found="this study is not on the PACS (deleted, or a mistyped UID)"):
            items = self._web.search_for_series(study_uid, search_filters=params, fields=list(SERIES_FIELDS))
        rows = [row for row in (series_row(item, study_uid) for item in items) if row.series_uid]
        return sorted(rows, key=lambda r: (r.series_number is None, r.series_number or 0, r.series_uid))

    def search(self, query: QueryFilter, limit: int = DEFAULT_LIMIT) -> list[StudyRow]:
        """Studies matching `query`, each with its series (filtered by the query's modality and series UID)."""
        studies = self.search_studies(query, limit)
        for study in studies:
            study.series = self.search_series(study.study_uid, query)
        return [s for s in studies if s.series or not (query.modality or query.series_uid)]

    # ----------------------------------------------------------------------- WADO-RS
    def iter_series(self, study_uid: str, series_uid: str) -> Iterator:
        """Each instance of a series as a pydicom Dataset as soon as it has arrived (streamed, as stored)."""
        with self._request("retrieving a series", not_found="this series is not on the PACS (deleted, or a mistyped UID)"):
            yield from self._web.iter_series(study_uid, series_uid, media_types=AS_STORED)

    def retrieve_series(self, study_uid: str, series_uid: str) -> list:
        """Every instance of a series as pydicom Datasets, in memory, as stored (no transcoding)."""
        return list(self.iter_series(study_uid, series_uid))

    # ----------------------------------------------------------------------- STOW-RS
    def store(self, datasets: Sequence, study_uid: str) -> StoreReport:
        """Store `datasets` into study `study_uid`; PacsError when the server refuses any of them."""
        with self._request("storing results", not_found="the PACS has no STOW-RS service at this address (HTTP 404)"):
            response = self._web.store_instances(list(datasets), study_instance_uid=study_uid)
        report = StoreReport(self.identity, study_uid)
        for item in response.get("ReferencedSOPSequence") or []:
            report.stored.append(str(item.get("ReferencedSOPInstanceUID", "")))
        for item in response.get("FailedSOPSequence") or []:
            report.failed.append(str(item.get("ReferencedSOPInstanceUID", "")))
        if report.failed:
            raise PacsError(f"the PACS at {self.identity} refused {len(report.failed)} of {len(datasets)} result objects")
        return report
