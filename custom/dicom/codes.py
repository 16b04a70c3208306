"""How the 14 ChestX-ray14 classes are coded in the DICOM results.

A class gets a standard SNOMED CT concept where the DICOM standard's own code tables (PS3.16, as shipped in
``pydicom.sr.codedict``, pydicom 3.0) hold one whose meaning is the class: seven of the fourteen. The other
seven (Atelectasis, Infiltration, Pneumonia, Consolidation, Emphysema, Pleural_Thickening, Hernia) are not in
those tables, and a SNOMED or RadLex code copied from memory, unchecked against the terminology, would be
worse than an honest private one; they are coded in the private scheme ``99CXR14`` (code value = the class's
two-digit index in ``custom.labels.CLASS_NAMES``), which every SR declares in its Coding Scheme Identification
Sequence. A site that maps them to its terminology edits ``STANDARD_CODES``; readers map codes back to classes
with :func:`class_of_code`, which accepts both schemes.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from custom.labels import CLASS_INDEX, CLASS_NAMES

PRIVATE_SCHEME = "99CXR14"
PRIVATE_SCHEME_NAME = "NIH ChestX-ray14 labels (chestxray14_rpsal_detection)"

# Class -> the DICOM standard's SNOMED CT concept (PS3.16 via pydicom.sr.codedict; value, meaning checked there).
STANDARD_CODES: dict[str, Code] = {
    "Cardiomegaly": codes.SCT.Cardiomegaly,  # 287272002 Cardiomegaly
    "Effusion": codes.SCT.PleuralEffusion,  # 60046008 Pleural effusion (NIH's "Effusion" is pleural)
    "Mass": codes.SCT.Mass,  # 4147007 Mass
    "Nodule": codes.SCT.Nodule,  # 27925004 Nodule
    "Pneumothorax": codes.SCT.Pneumothorax,  # 36118008 Pneumothorax
    "Edema": codes.SCT.PulmonaryEdema,  # 19242006 Pulmonary edema
    "Fibrosis": codes.SCT.Fibrosis,  # 112674009 Fibrosis
}


def private_code(class_name: str) -> Code:
    return Code(f"{CLASS_INDEX[class_name]:02d}", PRIVATE_SCHEME, class_name.replace("_", " "))


def finding_code(class_name: str) -> Code:
    """The coded concept of one class (standard where the table has one, else private)."""
    if class_name not in CLASS_INDEX:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASS_NAMES}")
    return STANDARD_CODES.get(class_name) or private_code(class_name)


def class_of_code(value: str, scheme: str) -> str:
    """The class name of a finding code written by :func:`finding_code`; ValueError for any other code."""
    if scheme == PRIVATE_SCHEME and value.isdigit() and int(value) < len(CLASS_NAMES):
        return CLASS_NAMES[int(value)]
    for class_name, code in STANDARD_CODES.items():
        if (code.value, code.scheme_designator) == (value, scheme):
            return class_name
    raise ValueError(f"finding code ({value}, {scheme}) is not one of this bundle's classes")


def private_scheme_item() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    """The Coding Scheme Identification item declaring ``99CXR14``."""
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME,
        responsible_organization="chestxray14_rpsal_detection")
