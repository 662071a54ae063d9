"""Run Presidio's DICOM image redactor on deid-data's ultrasound images (for bench/redaction.py).

Runs in a separate venv (`python -m venv V && V/bin/pip install presidio-image-redactor
pydicom deid-data`): Presidio pins its own Pillow and pulls OpenCV and spaCy, which
the project's environment must not get. Presidio's default analyzer downloads the
spaCy model en_core_web_lg from GitHub at first use (no spaCy English model is on
PyPI), so it fails offline; this script gives it a blank spaCy pipeline instead:
Presidio then finds PHI through its pattern recognizers and the DICOM header's own
values (use_metadata=True), without named-entity recognition.

    V/bin/python bench/_presidio_redact.py OUT_DIR   # writes OUT_DIR/<file>.npy, prints one JSON line per file
"""

import glob
import io
import json
import os
import sys
import time
import zipfile

import numpy as np
import pydicom
import spacy


def main(out_dir: str) -> None:
    import deid_data
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_image_redactor import DicomImageRedactorEngine, ImageAnalyzerEngine

    try:
        AnalyzerEngine()
        default = "ok"
    except Exception as exc:  # the spaCy model download
        default = f"{type(exc).__name__}: {str(exc)[:120]}"
    blank = os.path.join(out_dir, "blank_en")
    spacy.blank("en").to_disk(blank)
    nlp = NlpEngineProvider(
        nlp_configuration={"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": blank}]}
    ).create_engine()
    engine = DicomImageRedactorEngine(
        image_analyzer_engine=ImageAnalyzerEngine(analyzer_engine=AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"]))
    )
    base = os.path.join(os.path.dirname(deid_data.__file__), "data", "ultrasounds")
    for path in sorted(glob.glob(base + "/*.dcm")) + sorted(glob.glob(base + "/*.zip")):
        if path.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                ds = pydicom.dcmread(io.BytesIO(zf.read(zf.namelist()[0])))
        else:
            ds = pydicom.dcmread(path)
        name, start = os.path.basename(path), time.perf_counter()
        try:
            np.save(os.path.join(out_dir, name + ".npy"), engine.redact(ds, fill="contrast", use_metadata=True).pixel_array)
            row = {"name": name, "ok": True}
        except Exception as exc:
            row = {"name": name, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        print(json.dumps({**row, "seconds": round(time.perf_counter() - start, 2), "default_analyzer": default}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
