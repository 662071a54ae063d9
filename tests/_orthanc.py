"""A real Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) for the PACS tests, started and stopped by the test.

The fixture writes its own configuration into a temporary folder (storage
and index there, never the system service's), with authentication on
(`AuthenticationEnabled` set explicitly: otherwise it follows
`RemoteAccessAllowed`), `RemoteAccessAllowed: false` (Orthanc answers only
requests from this machine) and its DICOM (DIMSE) server disabled. Orthanc
1.10 has no bind-address option (its binary knows no *BindAddress key), so
the HTTP port, a free one, listens on every interface; with remote access
refused and the tests talking to 127.0.0.1 only, no traffic leaves loopback.

Without /usr/sbin/Orthanc or the DICOMweb plugin the tests skip with a
notice, unless MEDLENS_REQUIRE_ORTHANC=1 (CI), where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from _app import free_port

ORTHANC = Path(os.environ.get("MEDLENS_ORTHANC", "/usr/sbin/Orthanc"))
DICOMWEB_PLUGIN = Path(os.environ.get("MEDLENS_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
USER, PASSWORD = "medlens-test", "correct-horse-battery"

# Made-up patient data, distinctive enough to be found anywhere it leaks.
PHI = {
    "PatientName": "Quoxxa^Zyxlenn",
    "PatientID": "PHI77123QX",
    "PatientBirthDate": "19370405",
    "PatientSex": "O",
    "AccessionNumber": "ACC55321QX",
    "ReferringPhysicianName": "Vrobel^Draxmund",
    "InstitutionName": "Qorvath Memorial Clinic",
    "StudyID": "SQX991",
    "StudyDescription": "Zyxlenn abdomen follow-up",
}
PHI_STRINGS = ("Quoxxa", "Zyxlenn", "PHI77123QX", "19370405", "ACC55321QX", "Vrobel", "Draxmund", "Qorvath", "SQX991")


def require_orthanc() -> None:
    problem = None
    if not ORTHANC.exists():
        problem = f"{ORTHANC} is missing (apt-get install -y orthanc orthanc-dicomweb)"
    elif not DICOMWEB_PLUGIN.exists():
        problem = f"{DICOMWEB_PLUGIN} is missing (apt-get install -y orthanc-dicomweb)"
    if problem:
        if os.environ.get("MEDLENS_REQUIRE_ORTHANC") == "1":
            pytest.fail(f"MEDLENS_REQUIRE_ORTHANC=1 but {problem}")
        pytest.skip(problem)


@dataclass
class Orthanc:
    folder: Path
    port: int
    process: subprocess.Popen | None = None
    base: dict | None = None  # another configuration to run (its storage, ports and plugin path are replaced)

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"

    @property
    def log(self) -> Path:
        return self.folder / "orthanc.log"

    def config(self) -> dict:
        storage = str(self.folder / "storage")
        if self.base is not None:
            return {
                **self.base,
                "StorageDirectory": storage,
                "IndexDirectory": storage,
                "HttpPort": self.port,
                "DicomPort": free_port(),
                "Plugins": [str(DICOMWEB_PLUGIN)],
            }
        return {
            "Name": "MedLensTest",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "HttpDescribeErrors": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "StableAge": 1,
            "HttpThreadsCount": 8,
        }

    def start(self, timeout_s: float = 30.0) -> None:
        import requests

        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.log, "ab")
        self.process = subprocess.Popen([str(ORTHANC), str(path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.rest}/system", timeout=1).status_code in (200, 401):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def env(self, monkeypatch) -> None:
        """Point MedLens at this server (as a deployment would, through the environment)."""
        monkeypatch.setenv("MEDLENS_PACS_URL", self.dicomweb)
        monkeypatch.setenv("MEDLENS_PACS_USER", USER)
        monkeypatch.setenv("MEDLENS_PACS_PASSWORD", PASSWORD)
        monkeypatch.delenv("MEDLENS_PACS_TOKEN", raising=False)

    # ----------------------------------------------------------------------- test-side helpers (not MedLens code)
    def client(self):
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session_from_user_pass

        return DICOMwebClient(self.dicomweb, session=create_session_from_user_pass(USER, PASSWORD))

    def store(self, datasets) -> None:
        self.client().store_instances(list(datasets))

    def delete_study(self, study_uid: str) -> None:
        import requests

        found = requests.post(f"{self.rest}/tools/lookup", data=study_uid, auth=(USER, PASSWORD), timeout=10).json()
        for item in found:
            if item.get("Type") == "Study":
                requests.delete(f"{self.rest}/studies/{item['ID']}", auth=(USER, PASSWORD), timeout=10).raise_for_status()

    def series_of(self, study_uid: str) -> list[dict]:
        return self.client().search_for_series(study_uid)


@contextlib.contextmanager
def running_orthanc(folder: Path) -> Iterator[Orthanc]:
    require_orthanc()
    folder.mkdir(parents=True, exist_ok=True)
    server = Orthanc(folder, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def with_phi(datasets, study_uid: str | None = None, series_uid: str | None = None, phi: dict | None = None) -> list:
    """Copies of `datasets` as one new series of one new study, carrying the made-up patient data `phi`.

    Fresh Study/Series/SOP Instance UIDs are set (the shared CT series has empty ones), so every call gives a new study.
    """
    from pydicom.uid import generate_uid

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    out = []
    for i, source in enumerate(datasets):
        ds = source.copy()
        for keyword, value in (phi or PHI).items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.SeriesNumber = ds.get("SeriesNumber") or 3
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def synthetic_datasets(folder: Path, n_slices: int = 8) -> list:
    """A small CT series built from pydicom's CT_small (tests/_series.py), as datasets."""
    import pydicom

    from _series import synthetic_ct_series

    return [pydicom.dcmread(p) for p in sorted(synthetic_ct_series(folder, n_slices, marker=False))]


def shared_ct_datasets(shared_data: Path) -> list:
    """The 20-slice CT series of ../shared/data, as datasets."""
    import pydicom

    from _series import CT_SERIES_REL

    return [pydicom.dcmread(p) for p in sorted((shared_data / CT_SERIES_REL).iterdir()) if p.is_file()]


def save_series(datasets, folder: Path) -> Path:
    """Write `datasets` as files into `folder` (the same series on disk, to compare with the PACS)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets):
        ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
    return folder
