"""Start MONAI Label (``monailabel.main``) with a compatibility shim for pydicom 3.

monailabel 0.8.5 imports ``pydicom-seg`` 0.4.1 at server start, which imports
``pydicom._storage_sopclass_uids``, a module pydicom 3 no longer has (its UIDs moved to ``pydicom.uid``). The
bundle needs pydicom 3, so the old module name is aliased to ``pydicom.uid`` before MONAI Label is imported.
Every argument goes to MONAI Label's own command line, e.g.::

    .venv-monailabel/bin/python monailabel/start_server.py start_server --app monailabel --studies DIR \
        --conf bundle dist/chestxray14_rpsal_detection --host 127.0.0.1 --port 8000
"""

import sys

import pydicom.uid

try:
    import pydicom._storage_sopclass_uids  # pydicom 2 has it: nothing to do
except ModuleNotFoundError:
    sys.modules["pydicom._storage_sopclass_uids"] = pydicom.uid

if __name__ == "__main__":
    # This file's folder is sys.path[0] when run as a script; it holds no package named monailabel.
    from monailabel.main import Main

    Main().run()
