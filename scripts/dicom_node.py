"""A DICOM node for the bundle: radiographs from a PACS in, TID 1500 SR + GSPS back into their studies.

Usage::

    # listen mode: a Storage SCP; the PACS routes CR/DX images to RPSAL@<host>:11112
    python scripts/dicom_node.py listen --work_dir runs/node --port 11112 \\
        --destination http://127.0.0.1:8042/dicom-web            # STOW-RS, or dicom://ORTHANC@127.0.0.1:4242

    # pull mode: QIDO-RS for CR/DX of studies since a date (or by accession number), WADO-RS, STOW-RS back
    python scripts/dicom_node.py pull --work_dir runs/node --source http://127.0.0.1:8042/dicom-web \\
        [--since 20261201[HHMMSS]] [--accession_number A123] [--once] [--interval 30]

    python scripts/dicom_node.py status --work_dir runs/node   # the ledger: counts, refusals, waiting sends

Model options of listen and pull: ``--config_file`` (bundle/configs/inference.yaml; inference_dicom.yaml
beside it is merged on it), ``--ckpt_path``, ``--thresholds_file``, ``--overrides`` (YAML/JSON file of config
id -> value), ``--uid_prefix`` (the site's UID root), ``--secondary_capture`` (also the burnt-in picture).
The work folder holds the queue, the ledger and node.log; the node resumes from it after any stop, a SIGKILL
included (``custom.dicom.node_queue``). Stop with Ctrl-C or SIGTERM. See docs/dicom.md.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_CONFIG = str(REPO_ROOT / "bundle/configs/inference.yaml")


def _node(work_dir: str, destination: str, config_file: str, ckpt_path, thresholds_file, overrides, uid_prefix,
          secondary_capture: bool, calling_ae: str, retry_first: float, retry_longest: float):
    from custom.arguments import overrides_mapping, require_booleans
    from custom.dicom.node import DicomNode, RetryPolicy, log_to
    from custom.dicom.node_queue import NodeQueue
    from custom.dicom.transport import destination_from_url
    from custom.inference.service import FindingsService

    require_booleans(secondary_capture=secondary_capture)
    settings = overrides_mapping(overrides)
    if config_file == DEFAULT_CONFIG:
        settings.setdefault("bundle_root", str(REPO_ROOT / "bundle"))
    if ckpt_path is not None:
        settings["ckpt_path"] = str(ckpt_path)
    if thresholds_file is not None:
        settings["thresholds_file"] = str(thresholds_file)
    log_to(work_dir)
    target = destination_from_url(destination, calling_ae)
    configs = [config_file, str(Path(config_file).with_name("inference_dicom.yaml"))]
    service = FindingsService.from_config(configs, settings)
    version = str(service.parser.get_parsed_content("version"))
    if uid_prefix is None:
        uid_prefix = service.parser.get_parsed_content("uid_prefix")
    return DicomNode(NodeQueue(work_dir, version), service, target, uid_prefix, secondary_capture,
                     RetryPolicy(retry_first, retry_longest))


def _serve(node, server=None, pull=None, interval: float = 30.0) -> None:
    def stop(signum, frame):
        node.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    node.recover()  # before the SCP receives: recovery empties tmp/, where received images are staged
    if server is not None:
        server.start()
    try:
        node.run(pull=pull, pull_interval=interval)
    finally:
        if server is not None:
            server.stop()
        node.queue.close()


def listen(work_dir: str, destination: str, port: int = 11112, host: str = "127.0.0.1", ae_title: str = "RPSAL",
           config_file: str = DEFAULT_CONFIG, ckpt_path: str | None = None, thresholds_file: str | None = None,
           overrides=None, uid_prefix: str | None = None, secondary_capture: bool = False,
           retry_first: float = 5.0, retry_longest: float = 600.0) -> None:
    """Listen mode: receive by C-STORE on host:port as ae_title, infer, send the results to destination."""
    from custom.dicom.node import StorageServer

    node = _node(work_dir, destination, config_file, ckpt_path, thresholds_file, overrides, uid_prefix,
                 secondary_capture, ae_title, retry_first, retry_longest)
    _serve(node, server=StorageServer(node, port, host, ae_title))


def pull(work_dir: str, source: str, destination: str | None = None, since: str | None = None,
         accession_number: str | None = None, once: bool = False, interval: float = 30.0, ae_title: str = "RPSAL",
         config_file: str = DEFAULT_CONFIG, ckpt_path: str | None = None, thresholds_file: str | None = None,
         overrides=None, uid_prefix: str | None = None, secondary_capture: bool = False,
         retry_first: float = 5.0, retry_longest: float = 600.0) -> None:
    """Pull mode: QIDO-RS + WADO-RS from source (a DICOMweb root), results to destination (default: source).

    ``--once``: one query, then process and send what it found and exit (status 1 when something could not
    be retrieved, is left unsent or was refused); otherwise poll every ``interval`` seconds until stopped.
    """
    from custom.dicom.node_queue import OUTBOX, QUEUED
    from custom.dicom.transport import DicomwebSource, check_since

    since = None if since is None else str(since)
    check_since(since)  # before the model loads
    node = _node(work_dir, destination or source, config_file, ckpt_path, thresholds_file, overrides, uid_prefix,
                 secondary_capture, ae_title, retry_first, retry_longest)
    origin = DicomwebSource(source)
    accession_number = None if accession_number is None else str(accession_number)
    if not once:
        _serve(node, pull=lambda: node.pull(origin, since, accession_number), interval=interval)
        return
    node.recover()
    before = node.queue.counts()
    node.pull(origin, since, accession_number)
    node.process_pending()
    node.send_pending()
    after = node.queue.counts()
    node.queue.close()
    print(f"pull: {after} (refused now: {after['refused'] - before['refused']}, "
          f"not retrieved: {node.retrieve_failures})")
    if after[QUEUED] or after[OUTBOX] or after["refused"] > before["refused"] or node.retrieve_failures:
        sys.exit(1)


def status(work_dir: str, version: str | None = None) -> None:
    """Print the ledger: counts per state, the refusals with their reasons, the sends waiting to retry."""
    import sqlite3

    ledger = Path(work_dir) / "ledger.sqlite"
    if not ledger.is_file():
        raise FileNotFoundError(f"{ledger}: no ledger; is {work_dir} a node's work folder?")
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    where, parameters = ("WHERE version=?", (str(version),)) if version else ("", ())
    rows = db.execute("SELECT version, state, COUNT(*) FROM items " + where + " GROUP BY version, state",
                      parameters).fetchall()
    for row_version, state, count in rows:
        print(f"version {row_version}: {state} {count}")
    for uid, row_version, state, reason, attempts in db.execute(
            "SELECT sop_instance_uid, version, state, reason, attempts FROM items " + where
            + (" AND" if where else " WHERE") + " reason != '' ORDER BY updated", parameters):
        print(f"{state} {uid} (version {row_version}, attempts {attempts}): {reason}")


def main() -> None:
    import fire

    try:
        fire.Fire({"listen": listen, "pull": pull, "status": status})
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as error:  # bad arguments, folder in use
        print(f"dicom_node: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
