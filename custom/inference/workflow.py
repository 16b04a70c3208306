"""The inference workflow of ``inference.yaml``: a MONAI ``SupervisedEvaluator`` that keeps going past bad
files, with the dataset, collation and checkpoint loading it needs.

Data flow (``docs/architecture.md``): ``SkippingDataset`` applies the declared ``preprocessing`` and turns a
file's failure into a record; ``collate_inputs`` stacks the good images and puts the records aside;
``RpSalInferenceEvaluator`` logs the records (``<output_dir>/errors.txt`` and stderr), runs the ``inferer``
and the ``postprocessing`` per image (a failure there is that image's), and the writers (handlers) write each
image's files. After the run ``summary.json`` counts them, and ``finalize`` raises when any input failed, so
the process exits non-zero after every other output is written.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents, engine_apply_transform

from custom.atomic_file import write_json
from custom.inference.writers import ErrorLog, failure_reason, record_failure

logger = logging.getLogger(__name__)

FAILURES_KEY = "failures"
# The keys of a good item that travel through the batch (datalist extras such as boxes are ragged).
BATCH_KEYS = ("image", "original_size", "output_name", "image_path")


class SkippingDataset(torch.utils.data.Dataset):
    """A dataset that applies ``transform`` to each item and turns a failure into an error record.

    Args:
        data: items ``{"image": path, "output_name": str, ...}`` (``custom.inference.inputs.resolve_inputs``).
        transform: the preprocessing (MONAI Compose).

    ``__getitem__`` returns the transformed dict (with ``image_path``, the input file), or
    ``{"image": path, "output_name": ..., "error": reason}`` when the transform raised (a bad file, ...).
    """

    def __init__(self, data: Sequence[dict], transform: Callable):
        self.data = list(data)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        item = self.data[index]
        try:
            output = self.transform(dict(item))
        except Exception as error:  # any failure of one input is that input's, reported, never fatal
            return {"image": item.get("image"), "output_name": item.get("output_name"),
                    "error": failure_reason(error)}
        # The loaded tensor may drop its metadata (track_meta=False): the source path travels beside it.
        output.setdefault("image_path", item.get("image"))
        return output


def collate_inputs(items: list[dict]) -> dict:
    """A batch for the evaluator: the good items' ``image`` stacked (B, 3, S, S), ``original_size`` (B, 2),
    ``output_name`` and ``image_path`` as lists; the failed items' records under ``failures``. A batch of
    failures only has no ``image``."""
    good = [item for item in items if "error" not in item]
    batch: dict = {FAILURES_KEY: [item for item in items if "error" in item]}
    if good:
        batch["image"] = torch.stack([torch.as_tensor(item["image"]) for item in good])
        batch["original_size"] = torch.as_tensor([[int(v) for v in item["original_size"]] for item in good])
        batch["output_name"] = [item["output_name"] for item in good]
        batch["image_path"] = [str(item.get("image_path", item["output_name"])) for item in good]
    return batch


class RpSalInferenceEvaluator(SupervisedEvaluator):
    """MONAI's SupervisedEvaluator for batch inference that never stops at one bad input.

    Args:
        device, val_data_loader, network, inferer, postprocessing, val_handlers, amp: as SupervisedEvaluator
            (``val_data_loader`` collated by ``collate_inputs``; ``postprocessing`` applied per image).
        output_dir: where ``errors.txt`` and ``summary.json`` go (the writers write there too).

    Attributes after ``run``: ``errors`` (``ErrorLog``), ``written`` (output names whose findings JSON was
    written), ``total`` (inputs seen).
    """

    def __init__(self, device, val_data_loader, network, inferer, postprocessing: Callable | None,
                 output_dir: str | os.PathLike, val_handlers: Sequence | None = None, amp: bool = False, **kwargs):
        self.output_dir = Path(output_dir)
        self.errors: ErrorLog | None = None
        self.written: list[str] = []
        self.total = 0
        self._started = 0.0
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, inferer=inferer,
                         postprocessing=postprocessing, val_handlers=val_handlers, amp=amp, decollate=True,
                         **kwargs)
        self.add_event_handler(Events.STARTED, self._open)
        self.add_event_handler(Events.COMPLETED, self._summarise)

    def _register_postprocessing(self, posttrans: Callable) -> None:
        """Per image, as MONAI's, but a failure marks that image failed instead of stopping the run."""

        @self.on(IterationEvents.MODEL_COMPLETED)
        def _run_postprocessing(engine: RpSalInferenceEvaluator) -> None:
            for i, (item, output) in enumerate(zip(engine.state.batch, engine.state.output)):
                try:
                    engine.state.batch[i], engine.state.output[i] = engine_apply_transform(item, output, posttrans)
                except Exception as error:  # that image's failure, recorded; the others go on
                    record_failure(engine, item, output, f"postprocessing failed: {failure_reason(error)}")

    def _open(self, engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.errors = ErrorLog(self.output_dir)
        self.written, self.total = [], 0
        self._started = time.perf_counter()

    def _iteration(self, engine, batchdata: dict) -> dict | list:
        failures = batchdata.pop(FAILURES_KEY, [])
        for record in failures:
            self.errors.add(str(record["image"]), record["error"])
        self.total += len(failures) + (len(batchdata["image"]) if "image" in batchdata else 0)
        if "image" not in batchdata:  # every input of the batch failed to load
            engine.state.batch, engine.state.output = [], []
            return []
        return super()._iteration(engine, batchdata)

    def _summarise(self, engine) -> None:
        summary = {
            "inputs": self.total,
            "written": len(self.written),
            "failed": len(self.errors.failures),
            "errors_file": str(self.errors.path),
            "seconds": round(time.perf_counter() - self._started, 3),
        }
        write_json(self.output_dir / "summary.json", summary)
        logger.info(f"inference: {summary['written']} of {self.total} input(s) written to {self.output_dir}, "
                    f"{summary['failed']} failed")

    def finalize(self) -> None:
        """Raise RuntimeError when any input failed (after all outputs are written): a non-zero exit.

        The message counts the failures and names the errors file; it does not repeat them, so each failed
        input has exactly one line on stderr (written by ``ErrorLog.add``) and one in the file.
        """
        if self.errors is None:
            raise RuntimeError("RpSalInferenceEvaluator.finalize called before run")
        failures = self.errors.failures
        if failures:
            raise RuntimeError(
                f"{len(failures)} of {self.total} input(s) could not be processed; each is listed with its "
                f"reason in {self.errors.path} and on stderr ('inference: skipped <path>: <reason>')"
            )
