"""The DICOM node's on-disk queue and ledger alone (no PACS, no model): what a restart finds after a kill at
each point between two steps, and the back-off of the sending attempts."""

from __future__ import annotations

import os
import shutil

import pydicom
import pytest
from pydicom.data import get_testdata_file

from custom.dicom.node import MAX_INFERENCE_ATTEMPTS, DicomNode, RetryPolicy
from custom.dicom.node_queue import OUTBOX, QUEUED, REFUSED, SENT, NodeQueue, item_key

CR = get_testdata_file("RG1_UNCR.dcm")


@pytest.fixture
def cr() -> pydicom.Dataset:
    return pydicom.dcmread(CR)


def test_a_queued_image_survives_a_restart_and_is_queued_once(tmp_path, cr):
    queue = NodeQueue(tmp_path, "1.0")
    assert queue.put_file(queue.stage(cr), cr.SOPInstanceUID, cr.StudyInstanceUID)
    assert not queue.put_file(queue.stage(cr), cr.SOPInstanceUID)  # sent again: nothing new
    queue.close()
    restarted = NodeQueue(tmp_path, "1.0")
    assert restarted.recover() == 0
    (item,) = restarted.items()
    assert (item.state, item.study_instance_uid) == (QUEUED, cr.StudyInstanceUID)
    assert restarted.incoming_path(cr.SOPInstanceUID).is_file()
    assert list(restarted.tmp.iterdir()) == []
    # Another bundle version is another item, and leaves this version's pending file alone.
    restarted.close()
    upgraded = NodeQueue(tmp_path, "2.0")
    assert upgraded.recover() == 0 and upgraded.items() == []
    assert upgraded.put_file(upgraded.stage(cr), cr.SOPInstanceUID)
    assert len(list(upgraded.incoming.iterdir())) == 2
    upgraded.close()
    assert [item.state for item in NodeQueue(tmp_path, "1.0").items()] == [QUEUED]


def test_one_process_at_a_time_per_work_folder(tmp_path):
    first = NodeQueue(tmp_path, "1.0")
    with pytest.raises(RuntimeError, match=rf"in use by another node process \(pid {os.getpid()}\)"):
        NodeQueue(tmp_path, "1.0")
    first.close()
    NodeQueue(tmp_path, "1.0").close()


def test_a_file_renamed_into_incoming_before_its_row_is_recovered(tmp_path, cr):
    queue = NodeQueue(tmp_path, "1.0")
    staged = queue.stage(cr)
    staged.rename(queue.incoming_path(cr.SOPInstanceUID))  # killed here, before the row was written
    (tmp_path / "tmp" / "half-written.part").write_bytes(b"\0" * 10)
    (queue.incoming / f"{item_key('garbage', '1.0')}.dcm").write_bytes(b"not dicom")
    queue.close()
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
    queue.attempt_failed(cr.SOPInstanceUID, "PACS down", next_attempt=1e12)
    assert list(queue.due()) == []
    (item,) = queue.items(OUTBOX)
    assert (item.attempts, item.reason) == (1, "PACS down")
    outbox = queue.outbox_path(cr.SOPInstanceUID)
    kept = tmp_path / "kept"
    shutil.copytree(outbox, kept)
    queue.sent(cr.SOPInstanceUID)
    shutil.copytree(kept, outbox)  # killed after the row said sent, before the clean-up
    queue.close()
    restarted = NodeQueue(tmp_path, "1.0")
    restarted.recover()
    assert not outbox.exists() and restarted.counts() == {QUEUED: 0, OUTBOX: 0, SENT: 1, REFUSED: 0}


def test_a_refusal_keeps_its_reason_and_removes_the_files(tmp_path, cr):
    queue = NodeQueue(tmp_path, "1.0")
    queue.put_file(queue.stage(cr), cr.SOPInstanceUID)
    queue.refuse(cr.SOPInstanceUID, "inference failed: boom")
    assert queue.item(cr.SOPInstanceUID).reason == "inference failed: boom"
    assert not queue.incoming_path(cr.SOPInstanceUID).exists()
    assert not queue.put_file(queue.stage(cr), cr.SOPInstanceUID)


def test_a_refused_copy_does_not_undo_a_queued_one(tmp_path, cr):
    queue = NodeQueue(tmp_path, "1.0")
    queue.put_file(queue.stage(cr), cr.SOPInstanceUID)  # one association queued it
    assert not queue.refuse(cr.SOPInstanceUID, "a corrupt second copy", new=True)  # another refused a copy
    assert queue.item(cr.SOPInstanceUID).state == QUEUED and queue.incoming_path(cr.SOPInstanceUID).is_file()


def _failing(error: Exception):
    def findings(path: str) -> dict:
        raise error
    return findings


def test_inference_failures_the_image_causes_refuse_it_others_are_retried(tmp_path, cr):
    from custom.transforms.grey_image import ImageLoadError

    node = DicomNode(NodeQueue(tmp_path / "a", "1.0"), _failing(ImageLoadError("x.dcm", "pixels corrupt")), None)
    node.queue.put_file(node.queue.stage(cr), cr.SOPInstanceUID)
    assert node.process_pending() == 0
    assert "pixels corrupt" in node.queue.item(cr.SOPInstanceUID).reason
    assert node.queue.item(cr.SOPInstanceUID).state == REFUSED

    node = DicomNode(NodeQueue(tmp_path / "b", "1.0"), _failing(MemoryError("out of memory")), None,
                     retry=RetryPolicy(first=0.0, longest=0.0))
    node.queue.put_file(node.queue.stage(cr), cr.SOPInstanceUID)
    for attempt in range(1, MAX_INFERENCE_ATTEMPTS):
        assert node.process_pending() == 0
        item = node.queue.item(cr.SOPInstanceUID)
        assert (item.state, item.attempts) == (QUEUED, attempt) and "out of memory" in item.reason
    assert node.process_pending() == 0
    assert node.queue.item(cr.SOPInstanceUID).state == REFUSED


def test_back_off_doubles_up_to_its_longest_wait():
    policy = RetryPolicy(first=5.0, longest=600.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 8, 20)] == [5.0, 10.0, 20.0, 40.0, 600.0, 600.0]
