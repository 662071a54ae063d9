"""Evidence heat maps as a fractional DICOM SEG on the source instances' grid, and a secondary-capture overlay.

Design decisions
- SEG, FRACTIONAL (8-bit fractions), one segment per heat map (category DCM
  "Visual explanation"; type "Gradient-weighted class activation" for
  Grad-CAM, "Saliency" otherwise). Its frames are the source instances the
  evidence touches (engine.results.evidence.place / frame_of), so the SEG
  shares their geometry exactly and needs no resampling in a viewer; frames
  without evidence are left out. The values are relative evidence (the
  strongest pixel of the scan is 1), stated in the content description:
  they are not probabilities of a finding.
- The secondary capture (for viewers without SEG support) is the slice with
  the most evidence, rendered as the viewer renders it (engine.views, the
  scan's default window, orientation letters) with the heat blended in and
  "research use, not for diagnosis" burned into the pixels.
"""

from __future__ import annotations

import numpy as np

from engine.results.coding import instance_header
from engine.results.evidence import Heat, Placement, frame_of, place
from engine.results.schema import NOTICE, ModelRef, software_version
from engine.scan import Scan

# Evidence kind -> (segmented property type in DCM): engine.heatmap's methods and the Q-Former's attention.
_PROPERTY = {"gradcam": "GradientWeightedClassActivation"}


def placements(scan: Scan, instances) -> list[Placement]:
    """The source instances that are exactly one slice of `scan` (others belong to another scan of the series)."""
    found = [p for p in (place(scan, ref) for ref in instances) if p is not None]
    return sorted(found, key=lambda p: (p.axis or 0, p.index))


def build_seg(scan: Scan, heats: list[Heat], subject, where: list[Placement], series_uid: str, sop_uid: str, models: list[ModelRef]):
    """The fractional SEG of `heats` (one segment each, made by `models[i]`) on the instances `where`, or None without evidence."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames: list[np.ndarray] = []
    used: list[Placement] = []
    for placement in where:
        per_segment = [frame_of(heat, placement) for heat in heats]
        if all(f is None for f in per_segment):
            continue
        shape = (placement.ref.rows, placement.ref.cols)
        frames.append(np.stack([np.zeros(shape, np.float32) if f is None else f for f in per_segment], axis=-1))
        used.append(placement)
    if not used or len({f.shape for f in frames}) != 1:
        return None
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=f"evidence for {heat.target}"[:64],
            segmented_property_category=codes.DCM.VisualExplanation,
            segmented_property_type=getattr(codes.DCM, _PROPERTY.get(heat.method, "Saliency")),
            algorithm_type="AUTOMATIC",
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=model.name[:64],
                version=(model.revision or "unrecorded")[:64],
                family=codes.DCM.ArtificialIntelligence,
                parameters={"evidence": heat.method, "for": heat.target[:64]},
            ),
        )
        for n, (heat, model) in enumerate(zip(heats, models), start=1)
    ]
    pixels = np.clip(np.stack(frames), 0.0, 1.0)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return hd.seg.Segmentation(
        source_images=subject.source_datasets([p.ref for p in used]),
        pixel_array=pixels,
        segmentation_type="FRACTIONAL",
        segment_descriptions=descriptions,
        **instance_header("seg", series_uid, sop_uid),
        manufacturer_model_name=" + ".join(dict.fromkeys(m.name for m in models))[:64],
        software_versions=software_version()[:64],
        device_serial_number="none",
        fractional_type="PROBABILITY",
        content_label="EVIDENCE",
        content_description=f"relative evidence, strongest = 1; not a probability. {NOTICE}"[:64],
        content_creator_name="MedLens^",
    )


def _orientation_letter(vector) -> str:
    """The patient-orientation letters of an LPS direction (dominant components first)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    v = np.asarray(vector, dtype=float)
    order = np.argsort(-np.abs(v))
    out = "".join(letters[i][0 if v[i] > 0 else 1] for i in order if abs(v[i]) > 1e-3)
    return out[:2] or "L"


def _patient_orientation(heat: Heat, ref) -> tuple[str, str]:
    """Directions of increasing column and row of the rendered view (engine.views' radiological convention)."""
    views = {0: ("L", "P"), 1: ("L", "F"), 2: ("P", "F")}
    if heat.axis is not None:
        return views[heat.axis]
    if ref.orientation is not None:
        return _orientation_letter(ref.orientation[:3]), _orientation_letter(ref.orientation[3:])
    return ("L", "F")


def overlay_pixels(scan: Scan, heat: Heat, index: int) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB uint8 of slice `index` with the heat blended in, the notice burned in above it; (row_mm, col_mm) per pixel."""
    from PIL import Image, ImageDraw

    from engine.views import extract_slice, render_view
    from engine.windowing import default_window

    center, width, _ = default_window(scan)
    plane = heat.plane if heat.axis is not None else "image"
    rgb = render_view(scan, plane, index, center, width, size=512, square=False, letters=True, overlay=heat.slice_space(index))
    image, (row_mm, col_mm) = extract_slice(scan, plane, index)
    mm = (image.shape[0] * row_mm / rgb.shape[0], image.shape[1] * col_mm / rgb.shape[1])
    bar = 16  # black bands above and below the view carry the text, so no orientation letter is covered
    pil = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + 2 * bar))
    pil.paste(Image.fromarray(np.ascontiguousarray(rgb[..., :3])), (0, bar))
    draw = ImageDraw.Draw(pil)
    draw.text((3, 2), f"MedLens: {NOTICE}", fill=(255, 215, 0))
    draw.text((3, pil.height - bar + 2), f"evidence for {heat.target}"[:90], fill=(255, 215, 0))
    return np.asarray(pil), mm


def build_sc(scan: Scan, heat: Heat, subject, where: list[Placement], series_uid: str, sop_uid: str):
    """The secondary-capture overlay of the slice with the most evidence."""
    import highdicom as hd

    index = heat.strongest()
    shown = [p for p in where if p.axis == heat.axis and p.index == index] or where
    ref = shown[0].ref if shown else subject.instances[0]
    pixels, mm = overlay_pixels(scan, heat, index)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=subject.source_dataset(ref),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        **instance_header("sc", series_uid, sop_uid),
        pixel_spacing=(round(mm[0], 6), round(mm[1], 6)),
        patient_orientation=_patient_orientation(heat, ref),
    )
    if "Laterality" not in sc:
        sc.Laterality = ""  # General Series type 2C: empty, as dciodvfy cannot tell a paired body part is not shown
    sc.BurnedInAnnotation = "NO"  # the burned-in text is the research notice, nothing identifying
    sc.ImageComments = f"evidence for {heat.target}; {NOTICE}"[:10240]
    return sc
