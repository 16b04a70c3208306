"""The DICOM node against a real PACS on loopback: Orthanc (Debian's package, ``scripts/pacs.py``, configured by
``pacs/orthanc.json``), started on free ports for these tests and stopped after them. A machine where it cannot
start FAILS these tests with the reason (``apt-get install orthanc orthanc-dicomweb``); they are never skipped.

- pull mode: images stored in Orthanc by C-STORE are found by QIDO-RS, retrieved by WADO-RS, inferred and their
  SR + GSPS sent back by STOW-RS into the same studies; the SR parsed by highdicom matches the findings
  document; a re-sent study adds nothing;
- listen mode (the node as a process): Orthanc routes images to it by C-STORE; non-images, CT, corrupt pixel
  data and a missing UID are refused with the reason while it keeps serving; SIGKILL mid-queue and a restart
  lose nothing and duplicate nothing; results go back by C-STORE;
- an unreachable PACS: the results wait in the outbox and go once it is back (back-off).

Inputs: pydicom-data's real chest CR (RG1_UNCR.dcm) and real NIH PNGs wrapped as CR (scripts/png_to_dicom.py).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import yaml
from conftest import REPO_ROOT, subprocess_env
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless
from test_dicom_io import TINY_OVERRIDES

from custom.dicom import read_findings_sr
from custom.dicom.node import STATUS_REFUSED, DicomNode, RetryPolicy
from custom.dicom.node_queue import OUTBOX, QUEUED, REFUSED, SENT, NodeQueue
from custom.dicom.transport import DicomwebSource, StowDestination

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from pacs import Orthanc, PacsUnavailable  # noqa: E402
from png_to_dicom import wrap_png  # noqa: E402

NIH = REPO_ROOT / "tests" / "data" / "nih_sample"
CR = Path(get_testdata_file("RG1_UNCR.dcm"))
MODALITY, STUDY_UID, SERIES_UID, SOP_UID = 0x00080060, 0x0020000D, 0x0020000E, 0x00080018
CONFIGS = [str(REPO_ROOT / "bundle/configs/inference.yaml"), str(REPO_ROOT / "bundle/configs/inference_dicom.yaml")]


def _value(item: dict, tag: int):
    return item[f"{tag:08X}"]["Value"][0]


def _wrapped(test: str, count: int) -> list[pydicom.Dataset]:
    """``count`` real NIH PNGs wrapped as CR, each in a study of its own for ``test`` (tests/data holds four
    PNGs: beyond four they repeat, as new studies with their own UIDs and accession numbers)."""
    from pydicom.uid import generate_uid

    pngs = sorted((NIH / "images").glob("*.png"))
    images = []
    for index in range(count):
        dataset = wrap_png(pngs[index % len(pngs)], NIH / "Data_Entry_2017_v2020.csv")
        new = {part: generate_uid(entropy_srcs=[test, str(index), part]) for part in ("study", "series", "sop")}
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = new["study"], new["series"]
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = new["sop"]
        dataset.AccessionNumber = f"{test[:12]}{index:04d}"
        images.append(dataset)
    return images


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    try:
        pacs = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    except PacsUnavailable as error:
        pytest.fail(f"the PACS tests need a running Orthanc: {error}")
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def overrides(tiny_trained_model) -> dict:
    return {**TINY_OVERRIDES, "ckpt_path": str(tiny_trained_model["model"]), "bundle_root": str(REPO_ROOT / "bundle")}


@pytest.fixture(scope="module")
def service(overrides):
    from custom.inference.service import FindingsService

    return FindingsService.from_config(CONFIGS, overrides)


def _store(port: int, called: str, datasets, calling: str = "RPSAL") -> list:
    """C-STORE ``datasets`` to ``called``@127.0.0.1:``port``; returns the status datasets."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for dataset in datasets:
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title=called)
    assert association.is_established, f"no association with {called}@{port}"
    try:
        return [association.send_c_store(dataset) for dataset in datasets]
    finally:
        association.release()


def _echo(port: int, called: str = "RPSAL") -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="TESTER")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", port, ae_title=called)
    if not association.is_established:
        return False
    try:
        status = association.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        association.release()


def _in_study(client, study: str) -> dict[str, list[str]]:
    """{modality: [SOP Instance UID, ...]} of a study in the PACS (QIDO-RS)."""
    series = {_value(item, SERIES_UID): _value(item, MODALITY) for item in client.search_for_series(study)}
    found: dict[str, list[str]] = {}
    for item in client.search_for_instances(study_instance_uid=study):
        found.setdefault(series[_value(item, SERIES_UID)], []).append(_value(item, SOP_UID))
    return found


def _check_results(client, source: pydicom.Dataset, expected: dict) -> None:
    """The study holds the source, one SR and one GSPS; the SR equals the findings document (0.5 px, 1e-6)."""
    study = source.StudyInstanceUID
    found = _in_study(client, study)
    assert sorted(found) == ["CR", "PR", "SR"] and all(len(uids) == 1 for uids in found.values()), found
    sr_series = client.search_for_series(study, search_filters={"Modality": "SR"})[0]
    sr = client.retrieve_instance(study, _value(sr_series, SERIES_UID), found["SR"][0])
    findings = read_findings_sr(hd.sr.ComprehensiveSR.from_dataset(sr))
    boxes = {f["class"]: f["box"] for f in expected["findings"]}
    assert sorted(f.class_name for f in findings) == sorted(expected["positive"])
    for finding in findings:
        assert finding.probability == pytest.approx(expected["probabilities"][finding.class_name], abs=1e-6)
        if finding.box is None:
            assert finding.class_name in expected["positive_without_box"]
        else:
            assert list(finding.box) == pytest.approx(boxes[finding.class_name], abs=0.5)
    gsps_series = client.search_for_series(study, search_filters={"Modality": "PR"})[0]
    gsps = client.retrieve_instance(study, _value(gsps_series, SERIES_UID), found["PR"][0])
    referenced = gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sr.PatientID == gsps.PatientID == source.PatientID


def test_echo_and_an_unknown_ae_may_not_store(orthanc):
    assert _echo(orthanc.dicom_port, orthanc.aet)
    from pynetdicom import AE

    cr = pydicom.dcmread(CR)
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(cr.SOPClassUID, cr.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    # Orthanc refuses the association or the store of an AE its config does not list.
    if association.is_established:
        status = association.send_c_store(cr)
        association.release()
        assert not status or int(status.Status) != 0


def test_pull_mode_round_trip_into_the_same_studies(orthanc, service, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    sources = [pydicom.dcmread(CR), *_wrapped("pull", 2)]
    assert [int(s.Status) for s in _store(orthanc.dicom_port, orthanc.aet, sources)] == [0, 0, 0]
    node = DicomNode(NodeQueue(tmp_path / "node", "test-1"), service, StowDestination(orthanc.dicomweb_url))
    source = DicomwebSource(orthanc.dicomweb_url)
    assert node.pull(source) == 3
    assert node.process_pending() == 3 and node.send_pending() == 3
    assert node.queue.counts() == {QUEUED: 0, OUTBOX: 0, SENT: 3, REFUSED: 0}
    client = DICOMwebClient(orthanc.dicomweb_url)
    for dataset in sources:
        path = tmp_path / f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        _check_results(client, dataset, service(str(path)))
    # The studies sent again, and pulled again (all, then by accession number): nothing new anywhere.
    before = {s.StudyInstanceUID: _in_study(client, s.StudyInstanceUID) for s in sources}
    _store(orthanc.dicom_port, orthanc.aet, sources)
    assert node.pull(source) == 0
    assert node.pull(source, accession_number=sources[1].AccessionNumber) == 0
    assert len(source.find(accession_number=sources[1].AccessionNumber)) == 1
    # Since a date (and time): the CR was taken 2004-08-26 18:50:59 (the wrapped PNGs have no Study Date).
    cr_date = sources[0].StudyDate
    assert [uids[2] for uids in source.find(since=cr_date)] == [sources[0].SOPInstanceUID]
    assert source.find(since="29991231") == [] and source.find(since=f"{cr_date}185100") == []
    assert len(source.find(since=f"{cr_date}185059")) == 1
    assert node.process_pending() == 0 and node.send_pending() == 0
    assert {s.StudyInstanceUID: _in_study(client, s.StudyInstanceUID) for s in sources} == before


def test_unreachable_pacs_is_retried_with_back_off(orthanc, service, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    (image,) = _wrapped("retry", 1)
    retry = RetryPolicy(first=2.0, longest=4.0)
    node = DicomNode(NodeQueue(tmp_path / "node", "test-1"), service, StowDestination(orthanc.dicomweb_url),
                     retry=retry)
    orthanc.stop()
    try:
        assert node.admit(image) == (0, "")
        assert node.process_pending() == 1
        assert node.send_pending() == 0  # the PACS is down: kept, next try after the back-off
        (waiting,) = node.queue.items(OUTBOX)
        assert waiting.attempts == 1 and "ConnectionError" in waiting.reason
        assert node.send_pending() == 0 and node.queue.items(OUTBOX)[0].attempts == 1  # not yet due
        time.sleep(retry.delay(1) + 0.1)
        assert node.send_pending() == 0 and node.queue.items(OUTBOX)[0].attempts == 2
    finally:
        orthanc.start()
    time.sleep(retry.delay(2) + 0.1)
    assert node.send_pending() == 1
    assert node.queue.counts()[SENT] == 1
    found = _in_study(DICOMwebClient(orthanc.dicomweb_url), image.StudyInstanceUID)
    assert sorted(found) == ["PR", "SR"]  # the image itself went only to the node, never to this PACS


def _ledger(work: Path) -> dict[str, int]:
    if not (work / "ledger.sqlite").exists():
        return {}
    db = sqlite3.connect(f"file:{work / 'ledger.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return dict(db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
    except sqlite3.OperationalError:  # the node has not made its table yet
        return {}
    finally:
        db.close()


def _start_node(work: Path, orthanc: Orthanc, overrides_path: Path) -> subprocess.Popen:
    command = [sys.executable, "scripts/dicom_node.py", "listen", "--work_dir", str(work),
               "--port", str(orthanc.node_port),
               "--destination", f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
               "--overrides", str(overrides_path), "--retry_first", "0.5", "--retry_longest", "2"]
    log = open(work.parent / f"{work.name}.stderr", "ab")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(), stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, (work.parent / f"{work.name}.stderr").read_text()[-3000:]
        if _echo(orthanc.node_port):
            return process
        time.sleep(0.3)
    process.kill()
    pytest.fail("the node did not answer C-ECHO within 120 s")


def _route(orthanc: Orthanc, datasets) -> None:
    """Orthanc routes stored instances to the node (REST: store to the modality "rpsal", synchronously)."""
    ids = []
    for dataset in datasets:
        request = urllib.request.Request(f"{orthanc.http_url}/tools/lookup", data=dataset.SOPInstanceUID.encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            ids += [match["ID"] for match in json.load(answer) if match["Type"] == "Instance"]
    body = json.dumps({"Resources": ids, "Synchronous": True}).encode()
    request = urllib.request.Request(f"{orthanc.http_url}/modalities/rpsal/store", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        assert answer.status == 200


def _faulty_objects() -> dict[str, pydicom.Dataset]:
    """What a node must refuse, each with its own SOP Instance UID: SR, CT, corrupt pixels, no Study UID."""
    from pydicom.uid import generate_uid

    sr = pydicom.dcmread(get_testdata_file("reportsi.dcm"))
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    truncated = pydicom.dcmread(CR)
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 3]
    no_study = pydicom.dcmread(CR)
    del no_study.StudyInstanceUID
    for dataset in (truncated, no_study):
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return {"sr": sr, "ct": ct, "truncated": truncated, "no_study": no_study}


def test_listen_mode_faults_sigkill_and_restart(orthanc, overrides, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    overrides_path = tmp_path / "overrides.yaml"
    overrides_path.write_text(yaml.safe_dump(overrides))
    work = tmp_path / "node"
    node = _start_node(work, orthanc, overrides_path)
    try:
        # Faults: refused with the reason, logged with the SOP Instance UID; the node keeps serving.
        faulty = _faulty_objects()
        statuses = dict(zip(faulty, _store(orthanc.node_port, "RPSAL", faulty.values())))
        assert {name: int(status.Status) for name, status in statuses.items()} == dict.fromkeys(faulty, STATUS_REFUSED)
        assert "Basic Text SR Storage" in statuses["sr"].ErrorComment
        assert "CT Image Storage" in statuses["ct"].ErrorComment
        assert "pixel data" in statuses["truncated"].ErrorComment
        assert "StudyInstanceUID" in statuses["no_study"].ErrorComment
        log = (work / "node.log").read_text()
        for dataset in faulty.values():
            assert f"refused {dataset.SOPInstanceUID}" in log
        assert "is not a projection radiograph" in log
        assert _echo(orthanc.node_port)
        # A compressed transfer syntax over the wire: the real CR as JPEG 2000 lossless is accepted and queued.
        j2k = pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm"))
        assert j2k.file_meta.TransferSyntaxUID == JPEG2000Lossless
        assert [int(s.Status) for s in _store(orthanc.node_port, "RPSAL", [j2k])] == [0]

        # Routing from the PACS; SIGKILL once the first result is sent while others wait.
        images = _wrapped("listen", 6)
        assert all(int(s.Status) == 0 for s in _store(orthanc.dicom_port, orthanc.aet, images))
        _route(orthanc, images)
        deadline = time.monotonic() + 120
        while _ledger(work).get(SENT, 0) == 0:
            assert time.monotonic() < deadline and node.poll() is None, "no result sent within 120 s"
            time.sleep(0.02)
        node.send_signal(signal.SIGKILL)
        node.wait(timeout=30)
    finally:
        if node.poll() is None:
            node.kill()
    at_kill = _ledger(work)
    assert at_kill.get(QUEUED, 0) + at_kill.get(OUTBOX, 0) > 0, f"nothing was left mid-queue: {at_kill}"

    node = _start_node(work, orthanc, overrides_path)
    try:
        deadline = time.monotonic() + 120
        while _ledger(work).get(SENT, 0) < len(images) + 1:
            assert time.monotonic() < deadline and node.poll() is None, f"not all sent: {_ledger(work)}"
            time.sleep(0.2)
        _route(orthanc, images[:2])  # routed again: acknowledged, nothing new
        time.sleep(1.0)
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=60) == 0
    assert _ledger(work) == {SENT: len(images) + 1, REFUSED: len(faulty)}  # + the JPEG 2000 CR
    client = DICOMwebClient(orthanc.dicomweb_url)
    for image in images:
        found = _in_study(client, image.StudyInstanceUID)
        assert sorted(found) == ["CR", "PR", "SR"] and all(len(uids) == 1 for uids in found.values()), found
    assert not list((work / "incoming").iterdir()) and not list((work / "outbox").iterdir())
    status = subprocess.run([sys.executable, "scripts/dicom_node.py", "status", "--work_dir", str(work)],
                            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and f"sent {len(images) + 1}" in status.stdout and "CT Image Storage" in status.stdout
    assert os.path.getsize(work / "node.log") > 0


def test_pull_once_from_the_command_line(orthanc, overrides, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    (image,) = _wrapped("cli", 1)
    assert [int(s.Status) for s in _store(orthanc.dicom_port, orthanc.aet, [image])] == [0]
    overrides_path = tmp_path / "overrides.yaml"
    overrides_path.write_text(yaml.safe_dump(overrides))
    command = [sys.executable, "scripts/dicom_node.py", "pull", "--work_dir", str(tmp_path / "node"),
               "--source", orthanc.dicomweb_url, "--accession_number", image.AccessionNumber, "--once",
               "--overrides", str(overrides_path)]
    for _ in range(2):  # the second pass finds the instance in the ledger: nothing new, still exit 0
        run = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        assert "'sent': 1" in run.stdout and "not retrieved: 0" in run.stdout
    found = _in_study(DICOMwebClient(orthanc.dicomweb_url), image.StudyInstanceUID)
    assert sorted(found) == ["CR", "PR", "SR"] and all(len(uids) == 1 for uids in found.values()), found
    bad = subprocess.run([*command[:-2], "--since", "2026-12-01"], cwd=REPO_ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "since must be YYYYMMDD" in bad.stderr
