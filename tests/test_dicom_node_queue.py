"""The DICOM node's on-disk queue and ledger alone (no PACS, no model): what a restart finds after a kill at
each point between two steps, and the back-off of the sending attempts."""

from __future__ import annotations

import shutil

import pydicom
import pytest
from pydicom.data import get_testdata_file

from custom.dicom.node import RetryPolicy
from custom.dicom.node_queue import OUTBOX, QUEUED, REFUSED, SENT, NodeQueue, item_key

CR = get_testdata_file("RG1_UNCR.dcm")


@pytest.fixture
def cr() -> pydicom.Dataset:
    return pydicom.dcmread(CR)


def test_a_queued_image_survives_a_restart_and_is_queued_once(tmp_path, cr):
    queue = NodeQueue(tmp_path, "1.0")
    assert queue.put_file(queue.stage(cr), cr.SOPInstanceUID, cr.StudyInstanceUID)
    assert not queue.put_file(queue.stage(cr), cr.SOPInstanceUID)  # sent again: nothing new
    restarted = NodeQueue(tmp_path, "1.0")
    assert restarted.recover() == 0
    (item,) = restarted.items()
    assert (item.state, item.study_instance_uid) == (QUEUED, cr.StudyInstanceUID)
    assert restarted.incoming_path(cr.SOPInstanceUID).is_file()
    assert list(restarted.tmp.iterdir()) == []
    # Another bundle version is another item.
    assert NodeQueue(tmp_path, "2.0").put_file(NodeQueue(tmp_path, "2.0").stage(cr), cr.SOPInstanceUID)


def test_a_file_renamed_into_incoming_before_its_row_is_recovered(tmp_path, cr):
    queue = NodeQueue(tmp_path, "1.0")
    staged = queue.stage(cr)
    staged.rename(queue.incoming_path(cr.SOPInstanceUID))  # killed here, before the row was written
    (tmp_path / "tmp" / "half-written.part").write_bytes(b"\0" * 10)
    (queue.incoming / f"{item_key('garbage', '1.0')}.dcm").write_bytes(b"not dicom")
    restarted = NodeQueue(tmp_path, "1.0")
    assert restarted.recover() == 1
    assert [item.sop_instance_uid for item in restarted.items(QUEUED)] == [cr.SOPInstanceUID]
    assert list(restarted.tmp.iterdir()) == []
    assert [path.name for path in restarted.incoming.iterdir()] == [f"{item_key(cr.SOPInstanceUID, '1.0')}.dcm"]


def test_results_wait_in_the_outbox_and_leftovers_of_finished_items_go(tmp_path, cr):
    queue = NodeQueue(tmp_path, "1.0")
    queue.put_file(queue.stage(cr), cr.SOPInstanceUID)
    queue.set_results(cr.SOPInstanceUID, {"sr": cr})  # any dataset stands for a result here
    assert not queue.incoming_path(cr.SOPInstanceUID).exists()
    assert [ds.SOPInstanceUID for ds in queue.results(cr.SOPInstanceUID)] == [cr.SOPInstanceUID]
    queue.sending_failed(cr.SOPInstanceUID, "PACS down", next_attempt=1e12)
    assert list(queue.due()) == []
    (item,) = queue.items(OUTBOX)
    assert (item.attempts, item.reason) == (1, "PACS down")
    outbox = queue.outbox_path(cr.SOPInstanceUID)
    kept = tmp_path / "kept"
    shutil.copytree(outbox, kept)
    queue.sent(cr.SOPInstanceUID)
    shutil.copytree(kept, outbox)  # killed after the row said sent, before the clean-up
    NodeQueue(tmp_path, "1.0").recover()
    assert not outbox.exists() and queue.counts() == {QUEUED: 0, OUTBOX: 0, SENT: 1, REFUSED: 0}


def test_a_refusal_keeps_its_reason_and_removes_the_files(tmp_path, cr):
    queue = NodeQueue(tmp_path, "1.0")
    queue.put_file(queue.stage(cr), cr.SOPInstanceUID)
    queue.refuse(cr.SOPInstanceUID, "inference failed: boom")
    assert queue.item(cr.SOPInstanceUID).reason == "inference failed: boom"
    assert not queue.incoming_path(cr.SOPInstanceUID).exists()
    assert not queue.put_file(queue.stage(cr), cr.SOPInstanceUID)


def test_back_off_doubles_up_to_its_longest_wait():
    policy = RetryPolicy(first=5.0, longest=600.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 8, 20)] == [5.0, 10.0, 20.0, 40.0, 600.0, 600.0]
