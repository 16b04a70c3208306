"""A real PACS on loopback: Orthanc (Debian's package, ``scripts/pacs.py``, configured by ``pacs/orthanc.json``)
started on free ports for these tests and stopped after them. A machine where it cannot start FAILS these
tests with the reason (``apt-get install orthanc orthanc-dicomweb``); they are never skipped.

The round trip of a hospital's pull workflow (issue 16, first part): a modality stores a real chest CR by
C-STORE; the bundle side finds it by QIDO-RS, retrieves it by WADO-RS, runs the bundle's DICOM workflow on it,
and sends the SR and the Secondary Capture back by STOW-RS; a QIDO query then shows them in the CR's study.
"""

from __future__ import annotations

import subprocess
import sys

import pydicom
import pytest
import yaml

from conftest import REPO_ROOT, subprocess_env
from test_dicom_io import TINY_OVERRIDES

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from pacs import Orthanc, PacsUnavailable  # noqa: E402

MODALITY = 0x00080060
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SOP_UID = 0x00080018


def _value(item: dict, tag: int):
    return item[f"{tag:08X}"]["Value"][0]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    try:
        pacs = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    except PacsUnavailable as error:
        pytest.fail(f"the PACS tests need a running Orthanc: {error}")
    yield pacs
    pacs.stop()


def _store(pacs: Orthanc, dataset: pydicom.Dataset) -> int:
    """C-STORE as the modality the PACS knows (AE RPSAL on 127.0.0.1); returns the status."""
    from pynetdicom import AE

    ae = AE(ae_title="RPSAL")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.aet)
    assert association.is_established, "no association with Orthanc"
    try:
        return int(association.send_c_store(dataset).Status)
    finally:
        association.release()


def test_echo_and_an_unknown_ae_may_not_store(orthanc):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert association.is_established
    assert int(association.send_c_echo().Status) == 0
    association.release()
    from pydicom.data import get_testdata_file

    cr = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(cr.SOPClassUID, cr.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    # Orthanc refuses the association or the store of an AE its config does not list.
    if association.is_established:
        status = association.send_c_store(cr)
        association.release()
        assert not status or int(status.Status) != 0


def test_pull_infer_and_send_back_into_the_same_study(orthanc, tiny_trained_model, tmp_path):
    from dicomweb_client.api import DICOMwebClient
    from pydicom.data import get_testdata_file

    source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    assert _store(orthanc, source) == 0
    client = DICOMwebClient(orthanc.dicomweb_url)
    found = client.search_for_instances(search_filters={"Modality": "CR"})
    assert len(found) == 1
    study, series, sop = (_value(found[0], tag) for tag in (STUDY_UID, SERIES_UID, SOP_UID))
    assert (study, sop) == (source.StudyInstanceUID, source.SOPInstanceUID)
    retrieved = client.retrieve_instance(study, series, sop)
    inputs = tmp_path / "in"
    inputs.mkdir()
    retrieved.save_as(inputs / "retrieved.dcm", enforce_file_format=True)

    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({**TINY_OVERRIDES, "ckpt_path": str(tiny_trained_model["model"])}))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "scripts/dicom_infer.py", str(inputs), "--out_dir", str(out),
                          "--overrides", str(overrides)], cwd=REPO_ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [pydicom.dcmread(out / "retrieved_sr.dcm"), pydicom.dcmread(out / "retrieved_overlay.dcm")]
    client.store_instances(results)
    client.store_instances(results)  # sent twice: the PACS keeps one copy of each instance

    in_study = client.search_for_series(study_instance_uid=study)
    assert sorted(_value(item, MODALITY) for item in in_study) == ["CR", "OT", "SR"]
    instances = client.search_for_instances(study_instance_uid=study)
    assert sorted(_value(item, SOP_UID) for item in instances) == sorted(
        [sop, *(result.SOPInstanceUID for result in results)])
