"""Run the MONAI model zoo's own bundle checks (``tests/data/modelzoo_ci/verify_bundle.py``, unchanged) on an
exported bundle, with no network.

What differs from the zoo's CI, and nothing else: the metadata schema is copied from ``tests/data/schema/``
to ``<bundle>/eval/schema.json`` (the zoo's ``ci/prepare_schema.py`` downloads it there); an empty
``model_info.json`` stands for the zoo's list of published versions (a new bundle has none); large files are
checked locally instead of downloaded (this bundle lists none); any socket connection raises.

Usage: python tests/modelzoo_offline.py MODELS_PATH BUNDLE_NAME [full|min|regular]
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def _block_network() -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access blocked by tests/modelzoo_offline.py")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    socket.getaddrinfo = refuse  # type: ignore[assignment]


def verify(models_path: str, bundle: str, mode: str = "full") -> None:
    _block_network()
    bundle_path = Path(models_path) / bundle
    schema_url = json.loads((bundle_path / "configs" / "metadata.json").read_text())["schema"]
    schema = DATA / "schema" / schema_url.rsplit("/", 1)[-1]
    if not schema.is_file():
        raise FileNotFoundError(f"{schema}: the metadata schema {schema_url} is not vendored")
    (bundle_path / "eval").mkdir(exist_ok=True)
    shutil.copyfile(schema, bundle_path / "eval" / "schema.json")
    info = Path(models_path) / "model_info.json"
    if not info.exists():
        info.write_text("{}\n")
    sys.path.insert(0, str(DATA / "modelzoo_ci"))
    import verify_bundle  # the zoo's file, unchanged

    def local_large_files(bundle_path: str, large_file_name: str) -> None:
        raise RuntimeError(f"{bundle_path}/{large_file_name}: large files would be downloaded; none expected")

    verify_bundle.download_large_files = local_large_files
    verify_bundle.verify(bundle, str(models_path), mode)
    print(f"verify_bundle.verify({bundle!r}, mode={mode!r}) finished without error")


if __name__ == "__main__":
    verify(*sys.argv[1:])
