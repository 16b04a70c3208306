"""MONAI Label components of the chestxray14_rpsal_detection app (the app itself is ``../main.py``)."""
