"""The compressed transfer syntaxes PACS hold, through pydicom's decoder plugins (pylibjpeg, pylibjpeg-libjpeg,
pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls): each lossless one decodes to exactly the grey image of the
uncompressed original, and the DICOM node admits and reports on it.

Files: pydicom-data's real chest CR (``RG1_UNCR.dcm``) and the same CR as JPEG 2000 lossless (``RG1_J2KR.dcm``);
JPEG-LS and RLE made from ``RG1_UNCR.dcm`` by pydicom's own encoders; JPEG lossless (process 14, SV1) is a real
8-bit file of pydicom-data (``JPGLosslessP14SV1_1s_1f_8b.dcm``, an ultrasound frame) whose header is changed to
a CR (the compressed pixel stream is untouched), since no encoder for it is at hand. For that one the reference
is the same plugin's own decoding (pydicom's ``decompress``), so its first test shows only that the bundle's
loader reads it as pydicom does; the other three compare with pixels that were never compressed.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from test_dicom_io import TINY_OVERRIDES
from conftest import REPO_ROOT

from custom.dicom.node import DicomNode
from custom.dicom.node_queue import OUTBOX, NodeQueue
from custom.dicom.study import read_source

CR = get_testdata_file("RG1_UNCR.dcm")


def _jpeg_lossless_cr() -> pydicom.Dataset:
    dataset = pydicom.dcmread(get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    dataset.Modality = "CR"
    dataset.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["jpeg-lossless-study"])
    return dataset


def _compressed(syntax) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """(compressed dataset, its uncompressed reference)."""
    if syntax == JPEGLosslessSV1:
        compressed = _jpeg_lossless_cr()
        reference = _jpeg_lossless_cr()
        reference.decompress()
        return compressed, reference
    if syntax == JPEG2000Lossless:
        return pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm")), pydicom.dcmread(CR)
    compressed = pydicom.dcmread(CR)
    compressed.compress(syntax)
    return compressed, pydicom.dcmread(CR)


SYNTAXES = [JPEGLosslessSV1, JPEG2000Lossless, JPEGLSLossless, RLELossless]


@pytest.mark.parametrize("syntax", SYNTAXES, ids=[s.name for s in SYNTAXES])
def test_lossless_syntax_decodes_to_the_uncompressed_image(syntax, tmp_path):
    compressed, reference = _compressed(syntax)
    assert compressed.file_meta.TransferSyntaxUID == syntax
    assert reference.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    compressed.save_as(tmp_path / "compressed.dcm", enforce_file_format=True)
    reference.save_as(tmp_path / "reference.dcm", enforce_file_format=True)
    header, grey = read_source(tmp_path / "compressed.dcm")
    _, expected = read_source(tmp_path / "reference.dcm")
    assert grey.original_size == expected.original_size
    np.testing.assert_array_equal(grey.array, expected.array)


@pytest.fixture(scope="module")
def service(tiny_trained_model):
    from custom.inference.service import FindingsService

    overrides = {**TINY_OVERRIDES, "ckpt_path": str(tiny_trained_model["model"]),
                 "bundle_root": str(REPO_ROOT / "bundle")}
    return FindingsService.from_config([str(REPO_ROOT / "bundle/configs/inference.yaml"),
                                        str(REPO_ROOT / "bundle/configs/inference_dicom.yaml")], overrides)


@pytest.mark.parametrize("syntax", SYNTAXES, ids=[s.name for s in SYNTAXES])
def test_the_node_admits_and_reports_on_each_syntax(syntax, service, tmp_path):
    compressed, _ = _compressed(syntax)
    node = DicomNode(NodeQueue(tmp_path / "node", "test"), service, destination=None)
    assert node.admit(compressed) == (0, "")
    assert node.process_pending() == 1
    (item,) = node.queue.items(OUTBOX)
    assert item.sop_instance_uid == compressed.SOPInstanceUID
    kinds = sorted(path.stem for path in node.queue.outbox_path(item.sop_instance_uid).glob("*.dcm"))
    assert kinds == ["gsps", "sr"]
