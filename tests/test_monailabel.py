"""MONAI Label serves the exported bundle: a real server on 127.0.0.1, real radiographs, scores and boxes.

MONAI Label lives in its own virtual environment (``scripts/setup_monailabel.sh`` creates it the first time,
a few minutes; later runs reuse it). The test exports the session's tiny model, starts the app in
``monailabel/`` on a free loopback port, posts a real NIH PNG (by datastore id and as an upload) and the real
CR DICOM ``RG1_UNCR.dcm`` (as an upload), checks 14 scores and every box inside the image, checks that a CT
is refused, and stops the server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from pydicom.data import get_testdata_file
from test_export import TINY_OVERRIDES, export_bundle

from custom.inference.findings import validate_findings

MODEL = "chestxray14_rpsal_detection"
PNG = REPO_ROOT / "tests" / "data" / "nih_sample" / "images" / "00002578_000.png"
CR = Path(get_testdata_file("RG1_UNCR.dcm"))
CT = Path(get_testdata_file("CT_small.dcm"))
STARTUP_TIMEOUT = 300
REQUEST_TIMEOUT = 300


@pytest.fixture(scope="module")
def monailabel_python() -> str:
    """The python of MONAI Label's own venv (created or reused by scripts/setup_monailabel.sh)."""
    result = subprocess.run(["bash", "scripts/setup_monailabel.sh"], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=False, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    python = result.stdout.strip().splitlines()[-1]
    assert os.access(python, os.X_OK), python
    return python


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _post(url: str, file: Path | None = None, timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes]:
    """POST, with ``file`` as the multipart form field ``file`` (what ``curl -F file=@x`` sends)."""
    body, headers = b"", {}
    if file is not None:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file.name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + file.read_bytes() + (
                    f"\r\n--{boundary}--\r\n").encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory, monailabel_python, tiny_trained_model):
    """The MONAI Label server on a free 127.0.0.1 port; yields its base URL, stops it afterwards."""
    work = tmp_path_factory.mktemp("monailabel")
    bundle = export_bundle.export_bundle(str(work / "dist"), model=str(tiny_trained_model["model"]),
                                         overrides=TINY_OVERRIDES, make_zip=False)
    # A copy of the app: MONAI Label creates model/, lib/, logs/, bin/ inside the app folder.
    app = work / "app"
    shutil.copytree(REPO_ROOT / "monailabel", app, ignore=shutil.ignore_patterns(
        "__pycache__", "model", "lib", "logs", "bin"))
    studies = work / "studies"
    studies.mkdir()
    shutil.copy(PNG, studies / PNG.name)
    shutil.copy(CR, studies / CR.name)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the bundle carries its own code
    env.update(OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1",
               MONAI_LABEL_DATASTORE_FILE_EXT='["*.png", "*.jpg", "*.dcm"]')
    log_path = work / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [monailabel_python, str(app / "start_server.py"), "start_server", "--app", str(app),
             "--studies", str(studies), "--conf", "bundle", bundle, "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            _wait_until_up(process, url, log_path)
            yield {"url": url, "log": log_path}
        finally:
            _stop(process)


def _wait_until_up(process: subprocess.Popen, url: str, log_path: Path) -> None:
    """Poll ``/info/`` until it answers 200; fail with the log if the server exits or takes too long."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(f"MONAI Label exited with {process.returncode}:\n" + log_path.read_text()[-4000:])
        try:
            if _get(f"{url}/info/")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"MONAI Label did not answer within {STARTUP_TIMEOUT} s:\n"
                        + log_path.read_text()[-4000:])
        time.sleep(1)


def _stop(process: subprocess.Popen) -> None:
    """Stop the server's process group (uvicorn and anything it started): SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _check_result(status: int, body: bytes, size: tuple[int, int], log: Path) -> dict:
    assert status == 200, body[:2000].decode(errors="replace") + log.read_text()[-3000:]
    result = json.loads(body)
    validate_findings(result, REPO_ROOT / "bundle")  # MONAI Label's own keys (label_names, latencies) beside
    height, width = size
    assert result["original_size"] == [height, width]
    probabilities = result["probabilities"]
    assert len(probabilities) == 14 and all(0.0 <= p <= 1.0 for p in probabilities.values())
    # Decision threshold 0 in the exported config: every class is positive and has a box or says it has none.
    assert len(result["findings"]) + len(result["positive_without_box"]) == 14
    assert result["findings"], "no box at all"
    for finding in result["findings"]:
        x0, y0, x1, y1 = finding["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, finding
        assert finding["probability"] == probabilities[finding["class"]]
    return result


def test_info_lists_the_bundle_as_a_2d_detection_model(server):
    status, body = _get(f"{server['url']}/info/")
    assert status == 200
    model = json.loads(body)["models"][MODEL]
    assert model["type"] == "detection" and model["dimension"] == 2
    assert len(model["labels"]) == 14


def test_infer_png_by_datastore_id_and_by_upload(server):
    by_id = _check_result(*_post(f"{server['url']}/infer/{MODEL}?image={PNG.stem}&output=json"), (1024, 1024),
                          server["log"])
    uploaded = _check_result(*_post(f"{server['url']}/infer/{MODEL}?output=json", PNG), (1024, 1024),
                             server["log"])
    # The same image gives the same answer either way.
    assert by_id["probabilities"] == uploaded["probabilities"]
    assert by_id["findings"] == uploaded["findings"]
    # MONAI Label ran the bundle's own declared ids: its preprocessing, inferer and postprocessing.
    log = server["log"].read_text()
    for step in ("LoadChestXrayd", "RpSalInferer", "RpSalMapsd", "MapBoxesd", "Findingsd"):
        assert step in log, step


def test_the_task_only_sets_type_and_options():
    """The app's task is MONAI Label's stock BundleInferTask: it overrides no transform or inferer step."""
    import ast

    tree = ast.parse((REPO_ROOT / "monailabel" / "rpsal_label" / "infer.py").read_text())
    task = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "RpSalInferTask")
    methods = {node.name for node in task.body if isinstance(node, ast.FunctionDef)}
    assert methods == {"__init__", "run_detector", "writer"}, methods


def test_infer_dicom_upload_returns_boxes_in_its_pixel_grid(server):
    result = _check_result(*_post(f"{server['url']}/infer/{MODEL}?output=json", CR), (1955, 1841),
                           server["log"])
    assert result["boxes_in"].startswith("original image pixels")


def test_ct_is_refused(server):
    status, _ = _post(f"{server['url']}/infer/{MODEL}?output=json", CT)
    assert status == 500  # MONAI Label answers any task error with a plain-text 500
    # The reason is in the server's log (written just after the response: wait for it, briefly).
    deadline = time.monotonic() + 30
    while "CT Image Storage" not in server["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "is not a projection radiograph" in server["log"].read_text()
