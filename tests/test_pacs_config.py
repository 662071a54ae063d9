"""engine.pacs without a server: settings, `dicomweb:` paths and their sealing, query filters."""

from __future__ import annotations

import pytest

from engine.pacs import LocatorError, PacsConfigError, QueryError, config_from_settings, make_filter, parse, parse_query, storable
from engine.pacs.locator import Locator, seal

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"


@pytest.fixture
def env(monkeypatch):
    for name in ("URL", "USER", "PASSWORD", "TOKEN", "CA_BUNDLE", "ALLOW_HTTP", "TIMEOUT"):
        monkeypatch.delenv(f"MEDLENS_PACS_{name}", raising=False)
    return monkeypatch


def test_no_url_says_what_to_set(env):
    with pytest.raises(PacsConfigError, match="MEDLENS_PACS_URL"):
        config_from_settings()


def test_credentials_come_from_the_environment_and_stay_out_of_reprs(env):
    env.setenv("MEDLENS_PACS_URL", "https://pacs.example.org/dicom-web/")
    env.setenv("MEDLENS_PACS_USER", "radiology")
    env.setenv("MEDLENS_PACS_PASSWORD", "hunter2-secret")
    config = config_from_settings()
    assert config.url == "https://pacs.example.org/dicom-web"
    assert (config.user, config.password) == ("radiology", "hunter2-secret")
    assert "hunter2" not in repr(config) and "hunter2" not in config.describe()


@pytest.mark.parametrize(
    "url, message",
    [
        ("https://user:pw@pacs.example.org/dicom-web", "must not carry credentials"),
        ("http://pacs.example.org/dicom-web", "plain http://"),
        ("ftp://pacs.example.org/", "http\\(s\\) address"),
        ("pacs.example.org", "http\\(s\\) address"),
        ("https://pacs.example.org/dicom-web?x=1", "without '\\?'"),
    ],
)
def test_unsafe_or_malformed_urls_are_refused(env, url, message):
    env.setenv("MEDLENS_PACS_URL", url)
    with pytest.raises(PacsConfigError, match=message):
        config_from_settings()


def test_plain_http_is_fine_on_loopback_and_opt_in_elsewhere(env):
    env.setenv("MEDLENS_PACS_URL", "http://127.0.0.1:8042/dicom-web")
    assert config_from_settings().url.startswith("http://127.0.0.1")
    env.setenv("MEDLENS_PACS_URL", "http://localhost:8042/dicom-web")
    config_from_settings()
    env.setenv("MEDLENS_PACS_URL", "http://pacs.internal:8042/dicom-web")
    env.setenv("MEDLENS_PACS_ALLOW_HTTP", "1")
    assert config_from_settings().url == "http://pacs.internal:8042/dicom-web"


def test_half_credentials_and_both_kinds_are_refused(env):
    env.setenv("MEDLENS_PACS_URL", "https://pacs.example.org/dicom-web")
    env.setenv("MEDLENS_PACS_USER", "radiology")
    with pytest.raises(PacsConfigError, match="MEDLENS_PACS_PASSWORD is not set"):
        config_from_settings()
    env.setenv("MEDLENS_PACS_PASSWORD", "x")
    env.setenv("MEDLENS_PACS_TOKEN", "abc")
    with pytest.raises(PacsConfigError, match="not both"):
        config_from_settings()


def test_tls_is_verified_with_the_system_cas_or_a_given_bundle(env, tmp_path):
    from engine.pacs import PacsClient

    env.setenv("MEDLENS_PACS_URL", "https://pacs.example.org/dicom-web")
    assert PacsClient()._session.verify is True
    env.setenv("MEDLENS_PACS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(PacsConfigError, match="not a file"):
        config_from_settings()
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    env.setenv("MEDLENS_PACS_CA_BUNDLE", str(tmp_path / "ca.pem"))
    assert PacsClient()._session.verify == str(tmp_path / "ca.pem")


def test_token_goes_in_a_bearer_header(env):
    from engine.pacs import PacsClient

    env.setenv("MEDLENS_PACS_URL", "https://pacs.example.org/dicom-web")
    env.setenv("MEDLENS_PACS_TOKEN", "tok-123")
    client = PacsClient()
    assert client._session.headers["Authorization"] == "Bearer tok-123" and client._session.auth is None


# --------------------------------------------------------------------------- dicomweb: paths
def test_paths_parse_to_study_and_series():
    assert parse(f"dicomweb:{STUDY}/{SERIES}") == Locator(STUDY, SERIES)
    assert parse(f"dicomweb:{STUDY}") == Locator(STUDY, None)
    assert Locator(STUDY, SERIES).text == f"dicomweb:{STUDY}/{SERIES}"


@pytest.mark.parametrize("bad", ["dicomweb:", "dicomweb:1.2/3.4/5.6", "dicomweb:1.2.abc", f"dicomweb:{'1.' * 40}1", "/data/x.dcm"])
def test_malformed_paths_are_refused(bad):
    with pytest.raises(LocatorError):
        parse(bad)


def test_sealed_paths_hide_the_uids_open_again_and_refuse_tampering(monkeypatch):
    path = f"dicomweb:{STUDY}/{SERIES}"
    sealed = storable(path)
    assert sealed.startswith("dicomweb:sealed:") and STUDY not in sealed and SERIES not in sealed
    assert storable(path) == sealed == seal(Locator(STUDY, SERIES))  # deterministic: a library can look it up again
    assert storable(sealed) == sealed and storable("/data/ct") == "/data/ct"
    assert parse(sealed) == Locator(STUDY, SERIES)
    tampered = sealed[:-3] + ("A" if sealed[-3] != "A" else "B") + sealed[-2:]
    with pytest.raises(LocatorError, match="cannot be opened here"):
        parse(tampered)
    import engine.deid as deid

    monkeypatch.setenv("MEDLENS_UID_SALT", "another-salt")
    monkeypatch.setattr(deid, "_salt_cache", None)
    with pytest.raises(LocatorError, match="another MEDLENS_UID_SALT"):
        parse(sealed)


# --------------------------------------------------------------------------- queries
def test_query_words_become_exact_filters():
    query = parse_query("modality=ct date=20240101-20240131 patient-id=12345 accession=A-7")
    assert query.study_params() == {
        "PatientID": "12345",
        "AccessionNumber": "A-7",
        "StudyDate": "20240101-20240131",
        "ModalitiesInStudy": "CT",
    }
    assert query.series_params() == {"Modality": "CT"}
    assert make_filter(date="2024-02-03").study_params() == {"StudyDate": "20240203"}
    assert make_filter(date="20240101-").study_params() == {"StudyDate": "20240101-"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("patient-id=Doe^John", "percent-encoded"),
        ("name=Doe", "key=value"),
        ("modality", "key=value"),
        ("date=2024-13", "YYYYMMDD"),
        ("date=20240201-20240101", "ends before"),
        ("study=1.2.x", "not a DICOM UID"),
        ("", "empty query"),
    ],
)
def test_queries_that_orthanc_would_misread_are_refused(text, message):
    with pytest.raises((QueryError, LocatorError), match=message):
        parse_query(text)
