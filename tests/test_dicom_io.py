"""DICOM in, DICOM out: the SR and Secondary Capture join the radiograph's study; non-radiographs are refused.

Real files: ``RG1_UNCR.dcm`` (pydicom-data: PA chest CR, 1955x1841, 15-bit MONOCHROME1), ``CT_small.dcm``
(pydicom) and ``emri_small.dcm`` (pydicom-data: multi-frame enhanced MR). Outputs are read back with pydicom.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from conftest import REPO_ROOT, TINY_NETWORK, bundle_command, subprocess_env
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ComprehensiveSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
)

from custom.dicom import (
    DicomSourceError,
    Finding,
    build_findings_gsps,
    build_findings_sr,
    build_overlay_sc,
    read_findings_sr,
    read_source,
    render_overlay,
    result_uids,
)
from custom.dicom.codes import class_of_code, finding_code
from custom.dicom.secondary_capture import CLASS_COLOURS
from custom.dicom.study import save
from custom.inference.findings import validate_findings
from custom.labels import CLASS_INDEX, CLASS_NAMES
from custom.transforms import ImageLoadError

CR = Path(get_testdata_file("RG1_UNCR.dcm"))
CT = Path(get_testdata_file("CT_small.dcm"))
MULTIFRAME = Path(get_testdata_file("emri_small.dcm"))
PNG = REPO_ROOT / "tests" / "data" / "nih_sample" / "images" / "00000147_001.png"
CR_ROWS, CR_COLUMNS = 1955, 1841
TINY_OVERRIDES = {
    "image_size": 64,
    "num_workers": 0,
    **{f"network_def#{key}": value for key, value in TINY_NETWORK.items()},
    # Every class positive, so that the SR holds 14 findings to check.
    "threshold_defaults#default_decision_threshold": 0.0,
}
FINDINGS = [
    Finding("Cardiomegaly", 0.91, (610.5, 980.0, 1420.25, 1510.0)),
    Finding("Effusion", 0.62, (1200.0, 1300.0, 1800.0, 1900.0)),
    Finding("Nodule", 0.55, None),
]


def _same_study_new_series(ds, source) -> None:
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate",
                    "StudyID"):
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID != source.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


@pytest.fixture(scope="module")
def source():
    header, grey = read_source(CR)
    return header, grey


def test_read_source_decodes_the_monochrome1_cr(source):
    header, grey = source
    assert header.PhotometricInterpretation == "MONOCHROME1" and int(header.BitsStored) == 15
    assert grey.array.shape == (CR_ROWS, CR_COLUMNS) and grey.original_size == (CR_ROWS, CR_COLUMNS)
    assert 0.0 <= float(grey.array.min()) < float(grey.array.max()) <= 1.0


@pytest.mark.parametrize(("path", "expected"), [
    (CT, "CT Image Storage"),
    (MULTIFRAME, "not a projection radiograph"),
    (PNG, "not a DICOM file"),
])
def test_non_radiographs_are_refused_naming_the_file_and_reason(path, expected):
    with pytest.raises(ImageLoadError, match=expected) as info:
        read_source(path)
    assert str(path) in str(info.value)
    if path == PNG:
        assert isinstance(info.value, DicomSourceError)


def test_sr_is_a_tid1500_report_that_highdicom_parses_back(source, tmp_path):
    header, _ = source
    sr = build_findings_sr(header, FINDINGS, algorithm_version="9.9.9")
    path = save(sr, tmp_path / "sr.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == ComprehensiveSRStorage and ds.Modality == "SR"
    _same_study_new_series(ds, header)
    assert ds.VerificationFlag == "UNVERIFIED" and ds.CompletionFlag == "COMPLETE"
    assert "unverified" in ds.SeriesDescription.lower()
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    # The evidence names the source image in its series.
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == header.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        header.SOPInstanceUID)
    # highdicom reads it back: the same classes, probabilities and boxes (the box-less one without a region).
    parsed = hd.sr.srread(path)
    assert read_findings_sr(parsed) == FINDINGS
    groups = parsed.content.get_planar_roi_measurement_groups()
    assert len(groups) == 2 and len(parsed.content.get_image_measurement_groups()) == 1
    cardiomegaly = groups[0]
    assert (cardiomegaly.finding_type.value, cardiomegaly.finding_type.scheme_designator) == ("287272002", "SCT")
    assert cardiomegaly.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    np.testing.assert_allclose(cardiomegaly.roi.value, [[610.5, 980.0], [1420.25, 980.0], [1420.25, 1510.0],
                                                        [610.5, 1510.0], [610.5, 980.0]])
    selected_from = cardiomegaly.roi.ContentSequence[0]
    assert selected_from.RelationshipType == "SELECTED FROM"
    assert selected_from.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    assert cardiomegaly.tracking_identifier == "Cardiomegaly finding" and cardiomegaly.tracking_uid
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue for item in cardiomegaly[0].ContentSequence
             if item.ValueType == "TEXT"}
    assert texts["Algorithm Name"] == "RpSal (Hermoza et al., MICCAI 2020)" and texts["Algorithm Version"] == "9.9.9"
    probability = cardiomegaly.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))[0]
    assert probability.value == pytest.approx(0.91) and probability.unit.value == "1"
    # A class without a standard code is declared in the private scheme.
    assert [item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence] == ["99CXR14"]


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_every_class_code_reads_back_to_its_class(class_name):
    code = finding_code(class_name)
    assert class_of_code(code.value, code.scheme_designator) == class_name
    assert code.scheme_designator in ("SCT", "99CXR14")


def test_result_uids_are_deterministic_and_under_the_root(source):
    header, _ = source
    first = build_findings_sr(header, FINDINGS, "1.0.0", uid_prefix="1.2.826.0.1.3680043.10.999.")
    again = build_findings_sr(header, FINDINGS, "1.0.0", uid_prefix="1.2.826.0.1.3680043.10.999.")
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert first.SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.999.") and len(first.SOPInstanceUID) <= 64
    other_version = build_findings_sr(header, FINDINGS, "1.0.1", uid_prefix="1.2.826.0.1.3680043.10.999.")
    gsps = build_findings_gsps(header, FINDINGS, "1.0.0", uid_prefix="1.2.826.0.1.3680043.10.999.")
    uids = {first.SOPInstanceUID, other_version.SOPInstanceUID, gsps.SOPInstanceUID, header.SOPInstanceUID}
    assert len(uids) == 4
    with pytest.raises(ValueError, match="kind"):
        result_uids(header.SOPInstanceUID, "1.0.0", "seg")
    # The sources are kept apart: a SOP Instance UID and a version that concatenate alike give other UIDs.
    assert result_uids("1.2.3", "10.3.0", "sr") != result_uids("1.2.31", "0.3.0", "sr")
    with pytest.raises(ValueError, match="at most 40"):
        result_uids(header.SOPInstanceUID, "1.0.0", "sr", uid_prefix="1." * 25)


def test_sr_without_findings_and_bad_findings(source):
    header, _ = source
    ds = build_findings_sr(header, [])
    assert read_findings_sr(ds) == []
    with pytest.raises(ValueError, match="reported once"):
        build_findings_sr(header, [FINDINGS[0], FINDINGS[0]])
    with pytest.raises(ValueError, match="unknown class"):
        Finding("Tuberculosis", 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        Finding("Mass", 1.5)
    with pytest.raises(ValueError, match="x1 > x0"):
        Finding("Mass", 0.5, (10, 10, 5, 20))


def test_presentation_state_draws_the_boxes_over_the_original_image(source, tmp_path):
    header, _ = source
    path = save(build_findings_gsps(header, FINDINGS, "9.9.9"), tmp_path / "gsps.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage and ds.Modality == "PR"
    _same_study_new_series(ds, header)
    assert "unverified" in ds.SeriesDescription.lower()
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == header.SeriesInstanceUID
    assert referenced.ReferencedImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    assert ds.PresentationLUTShape == "INVERSE"  # the source is MONOCHROME1
    annotation = ds.GraphicAnnotationSequence[0]
    boxes = [np.asarray(item.GraphicData, dtype=float).reshape(-1, 2) for item in annotation.GraphicObjectSequence]
    assert [item.GraphicAnnotationUnits for item in annotation.GraphicObjectSequence] == ["PIXEL", "PIXEL"]
    np.testing.assert_allclose(boxes[0][[0, 2]], [[610.5, 980.0], [1420.25, 1510.0]])
    labels = [item.UnformattedTextValue for item in annotation.TextObjectSequence]
    assert labels == ["Cardiomegaly 0.91", "Effusion 0.62", "Nodule 0.55 (no box)"]


def test_overlay_secondary_capture_round_trip(source, tmp_path):
    header, grey = source
    rgb = render_overlay(grey.array, FINDINGS)
    assert rgb.shape == (CR_ROWS, CR_COLUMNS, 3) and rgb.dtype == np.uint8
    sc = build_overlay_sc(header, rgb)
    path = save(sc, tmp_path / "sc.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SecondaryCaptureImageStorage and ds.Modality == "OT"
    _same_study_new_series(ds, header)
    assert "unverified" in ds.SeriesDescription.lower()
    assert ds.BurnedInAnnotation == "YES" and ds.PhotometricInterpretation == "RGB"
    pixels = ds.pixel_array
    assert pixels.shape == (CR_ROWS, CR_COLUMNS, 3)
    np.testing.assert_array_equal(pixels, rgb)
    # The box edge is drawn in the class colour where the SR puts the box (left edge x0 = 610.5).
    colour = CLASS_COLOURS[CLASS_INDEX["Cardiomegaly"]]
    assert tuple(pixels[1200, 611]) == colour
    # Away from every box and label the radiograph is unchanged (grey).
    r, g, b = (int(v) for v in pixels[200, 900])
    assert r == g == b


@pytest.fixture(scope="module")
def overrides_file(tmp_path_factory, tiny_trained_model) -> Path:
    path = tmp_path_factory.mktemp("dicom_config") / "overrides.yaml"
    path.write_text(yaml.safe_dump({**TINY_OVERRIDES, "ckpt_path": str(tiny_trained_model["model"])}))
    return path


def _check_outputs(out: Path, stem: str, secondary_capture: bool = False) -> None:
    """The SR and GSPS (and Secondary Capture) written for RG1_UNCR: same study, one finding per positive
    class, boxes inside the image and equal (0.5 px) to the findings document's."""
    source = pydicom.dcmread(CR, stop_before_pixels=True)
    result = json.loads((out / f"{stem}_findings.json").read_text())
    validate_findings(result, REPO_ROOT / "bundle")
    expected_files = {"sr": f"{stem}_sr.dcm", "presentation_state": f"{stem}_gsps.dcm"}
    if secondary_capture:
        expected_files["overlay_dicom"] = f"{stem}_overlay.dcm"
    assert result["files"] == expected_files
    sr = hd.sr.srread(out / f"{stem}_sr.dcm")
    gsps = pydicom.dcmread(out / f"{stem}_gsps.dcm")
    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert gsps.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage
    _same_study_new_series(sr, source)
    _same_study_new_series(gsps, source)
    assert sr.SeriesInstanceUID != gsps.SeriesInstanceUID
    assert result["original_size"] == [CR_ROWS, CR_COLUMNS]
    findings = read_findings_sr(sr)
    assert sorted(f.class_name for f in findings) == sorted(result["positive"])
    assert len(findings) == 14  # decision threshold 0: every class positive
    by_class = {f["class"]: f for f in result["findings"]}
    for finding in findings:
        assert finding.probability == pytest.approx(result["probabilities"][finding.class_name], abs=1e-6)
        if finding.box is None:
            assert finding.class_name in result["positive_without_box"]
            continue
        x0, y0, x1, y1 = finding.box
        assert 0 <= x0 < x1 <= CR_COLUMNS and 0 <= y0 < y1 <= CR_ROWS
        assert list(finding.box) == pytest.approx(by_class[finding.class_name]["box"], abs=0.5)
    assert [f.class_name for f in findings] == [n for n in CLASS_NAMES if n in result["positive"]]
    assert len(gsps.GraphicAnnotationSequence[0].TextObjectSequence) == 14
    if secondary_capture:
        overlay = pydicom.dcmread(out / f"{stem}_overlay.dcm")
        assert overlay.SOPClassUID == SecondaryCaptureImageStorage
        _same_study_new_series(overlay, source)
        assert overlay.pixel_array.shape == (CR_ROWS, CR_COLUMNS, 3)
    else:
        assert not (out / f"{stem}_overlay.dcm").exists()


def test_dicom_infer_cli_writes_sr_and_gsps_and_refuses_ct(tmp_path, overrides_file):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(CR, inputs / "RG1_UNCR.dcm")
    shutil.copy(CT, inputs / "CT_small.dcm")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "scripts/dicom_infer.py", str(inputs), "--out_dir", str(out),
         "--overrides", str(overrides_file)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, check=False, timeout=600,
    )
    # Exit 1: one input refused; the radiograph is still reported.
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    errors = (out / "errors.txt").read_text()
    assert "CT_small.dcm" in errors and "CT Image Storage" in errors
    assert "not a projection radiograph" in errors
    assert "RG1_UNCR" not in errors
    _check_outputs(out, "RG1_UNCR")
    assert not list(out.glob("CT_small*.dcm"))


def test_bundle_dicom_config_runs_with_monai_bundle(tmp_path, overrides_file):
    out = tmp_path / "out"
    configs = ["bundle/configs/inference.yaml", "bundle/configs/inference_dicom.yaml", str(overrides_file)]
    command = bundle_command(configs, "run") + ["--input", str(CR), "--output_dir", str(out),
                                                "--secondary_capture", "True"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                            check=False,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "errors.txt").read_text() == ""
    _check_outputs(out, "RG1_UNCR", secondary_capture=True)
