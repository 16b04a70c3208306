"""MONAI Label app serving the chestxray14_rpsal_detection bundle (14 class probabilities + boxes per image).

Start it with ``monailabel/start_server.py`` (see docs/monailabel.md)::

    .venv-monailabel/bin/python monailabel/start_server.py start_server --app monailabel \
        --studies STUDIES_DIR --conf bundle dist/chestxray14_rpsal_detection --host 127.0.0.1 --port 8000

``--conf bundle PATH``: the exported bundle folder (``scripts/export_bundle.py``); default
``<app>/model/chestxray14_rpsal_detection``. ``--conf model_name NAME``: the name served at
``/infer/NAME`` (default the bundle folder's name). Inference only: no trainer, no active-learning scoring.
"""

from __future__ import annotations

import json
import logging
import os

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from rpsal_label.infer import RpSalInferTask

logger = logging.getLogger(__name__)

BUNDLE_NAME = "chestxray14_rpsal_detection"


class MyApp(MONAILabelApp):
    """The app: one inference task, the RpSal bundle at ``conf["bundle"]``."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.bundle_path = os.path.realpath(conf.get("bundle") or os.path.join(app_dir, "model", BUNDLE_NAME))
        if not os.path.isfile(os.path.join(self.bundle_path, "configs", "metadata.json")):
            raise FileNotFoundError(f"{self.bundle_path}: not a bundle folder (no configs/metadata.json); "
                                    "export one with scripts/export_bundle.py and pass --conf bundle PATH")
        self.model_name = conf.get("model_name") or os.path.basename(self.bundle_path)
        with open(os.path.join(self.bundle_path, "configs", "metadata.json")) as handle:
            version = json.load(handle).get("version", "0")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"RpSal chest X-ray findings ({BUNDLE_NAME})",
            description="Weakly supervised detection of 14 thoracic diseases: probabilities and boxes",
            version=version,
        )

    def init_infers(self) -> dict[str, InferTask]:
        task = RpSalInferTask(self.bundle_path, self.conf)
        if not task.is_valid():
            raise RuntimeError(f"{self.bundle_path}: MONAI Label could not load the bundle "
                               "(see the log above)")
        logger.info(f"+++ Adding Inferer:: {self.model_name} => {self.bundle_path}")
        return {self.model_name: task}

    def init_trainers(self) -> dict:
        return {}

    def init_strategies(self) -> dict:
        return {}
