"""MONAI dictionary transforms of this bundle (loading PNG/DICOM/cache to one grey channel, box mapping)."""
