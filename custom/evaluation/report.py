"""The evaluation report: the paper's Tables 1-3 (Markdown, CSV, JSON) with the prior rows, under both
protocols, plus ROC and T(IoU) curves and Fig. 3-style overlays.

Files written to the report folder::

    report.md                       everything below in one page, with the protocol notes
    table1_auc.{md,csv,json}        AUC per class and mean: image logits (the paper's), combined logits
    table2_localisation.{md,csv,json}  mean IoU per class (Sal, Det, Mix, prior) under each protocol; cDice
    table3_t_iou.{md,csv,json}      T(IoU >= 0.3, 0.5, 0.6) per class, each protocol, with the prior
    table3_t_iou_curve.{md,csv,json}  T(IoU >= kappa) for kappa = 0.1 ... 0.7
    summary.json                    per class IoU and T(0.5) of every map and the prior, both protocols
    roc_curves.png, t_iou_curves.png, fig3_overlays.png, overlays/<image>_<class>.png

Reference rows from the paper (NIH's official test set, its own protocol) are labelled "paper (NIH)"; they
are there for the layout and scale, not as numbers this run should match on other data.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from custom.thresholds_file import as_plain
from custom.evaluation.outputs import MAP_NAMES, EvaluationOutputs
from custom.evaluation.scoring import PROTOCOL_TITLES, PROTOCOLS, EvaluationResult
from custom.atomic_file import write_json

ABBREVIATIONS = {
    "Atelectasis": "Atel",
    "Cardiomegaly": "Card",
    "Effusion": "Effu",
    "Infiltration": "Infi",
    "Mass": "Mass",
    "Nodule": "Nodu",
    "Pneumonia": "Pne1",
    "Pneumothorax": "Pne2",
}
METHOD_TITLES = {
    "sal": "Sal",
    "det": "Det",
    "mix": "Mix",
    "prior": "prior (leave-one-out mean box)",
    "prior_other_fold": "prior (other fold's mean box)",
}
PROTOCOL_SHORT = {"all_images": "paper (all box images)", "two_fold": "held-out (2-fold)"}
TABLE3_KAPPAS = (0.3, 0.5, 0.6)
PAPER = "paper (NIH)"
# The paper's numbers (Hermoza et al. 2020, Tables 1-3): NIH's official test split, thresholds on test boxes.
PAPER_AUC = {
    "Atelectasis": 0.775,
    "Cardiomegaly": 0.881,
    "Effusion": 0.831,
    "Infiltration": 0.695,
    "Mass": 0.826,
    "Nodule": 0.789,
    "Pneumonia": 0.741,
    "Pneumothorax": 0.879,
    "Consolidation": 0.747,
    "Edema": 0.846,
    "Emphysema": 0.936,
    "Fibrosis": 0.833,
    "Pleural_Thickening": 0.793,
    "Hernia": 0.917,
    "mean": 0.821,
}
_BOX_ORDER = tuple(ABBREVIATIONS)
PAPER_IOU = {
    "sal": (0.201, 0.558, 0.208, 0.300, 0.230, 0.080, 0.335, 0.144, 0.257),
    "det": (0.216, 0.663, 0.221, 0.322, 0.216, 0.081, 0.327, 0.128, 0.272),
    "mix": (0.240, 0.662, 0.226, 0.343, 0.240, 0.092, 0.346, 0.133, 0.285),
}
PAPER_CDICE = {
    "sal": (0.296, 0.737, 0.333, 0.374, 0.294, 0.059, 0.424, 0.222, 0.342),
    "det": (0.376, 0.590, 0.363, 0.449, 0.361, 0.143, 0.494, 0.200, 0.372),
    "mix": (0.403, 0.500, 0.355, 0.431, 0.403, 0.181, 0.493, 0.190, 0.370),
}
PAPER_T_IOU = {
    0.3: (0.37, 0.99, 0.37, 0.54, 0.35, 0.04, 0.60, 0.21, 0.43),
    0.5: (0.11, 0.92, 0.05, 0.30, 0.13, 0.00, 0.27, 0.06, 0.23),
    0.6: (0.04, 0.73, 0.01, 0.20, 0.05, 0.00, 0.18, 0.01, 0.15),
}


@dataclass
class Table:
    """A report table: ``columns`` names, ``rows`` of values (str, float or None), notes under it."""

    name: str
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self, digits: int = 3) -> str:
        """GitHub Markdown: a bold title, the table, the notes as a list."""

        def cell(value) -> str:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return "-"
            return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

        lines = [
            f"**{self.title}**",
            "",
            "| " + " | ".join(self.columns) + " |",
            "|" + "---|" * len(self.columns),
        ]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines + [""] + [f"- {note}" for note in self.notes])

    def write(self, folder: str | Path) -> list[Path]:
        """Write ``<name>.md``, ``.csv`` (full precision, empty cells for missing) and ``.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{self.name}.{ext}" for ext in ("md", "csv", "json")]
        paths[0].write_text(self.markdown() + "\n", encoding="utf-8")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(
            [
                ["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row]
                for row in self.rows
            ]
        )
        paths[1].write_text(buffer.getvalue(), encoding="utf-8")
        write_json(
            paths[2],
            as_plain(
                {
                    "title": self.title,
                    "notes": self.notes,
                    "columns": self.columns,
                    "rows": [dict(zip(self.columns, row)) for row in self.rows],
                }
            ),
        )
        return paths


def _class_columns(names: Sequence[str]) -> list[str]:
    return [ABBREVIATIONS.get(name, name[:4]) for name in names] + ["Mean"]


def _row_values(table: dict, names: Sequence[str]) -> list:
    return [table.get(name) for name in names] + [table.get("mean")]


def _paper_rows_apply(outputs: EvaluationOutputs) -> bool:
    """The paper's localisation rows line up only with NIH's 8 box classes."""
    return tuple(outputs.box_class_names) == _BOX_ORDER


def table1(outputs: EvaluationOutputs, result: EvaluationResult) -> Table:
    """Table 1: AUC per class and the mean, on the image logits (the paper's) and the combined logits."""
    rows = []
    positives = outputs.test_labels.sum(axis=0)
    for k, name in enumerate(outputs.class_names):
        rows.append(
            [
                name,
                float(result.auc["image"]["per_class"][k]),
                float(result.auc["combined"]["per_class"][k]),
                int(positives[k]),
                PAPER_AUC.get(name),
            ]
        )
    rows.append(
        ["Mean", result.auc["image"]["mean"], result.auc["combined"]["mean"], None, PAPER_AUC["mean"]]
    )
    return Table(
        "table1_auc",
        "Table 1. Classification: test AUC per class",
        ["Label", "AUC, image logits y", "AUC, combined y + z", "test positives", PAPER],
        rows,
        [
            f"{len(outputs.test_labels)} test images; the paper reports AUC on the image logits y.",
            "Mean: over the classes with both labels present (NaN classes are left out).",
            f"{PAPER}: the paper's 'Ours' column (NIH official test split).",
        ],
    )


def table2(outputs: EvaluationOutputs, result: EvaluationResult) -> Table:
    """Table 2: mean IoU per class of Sal, Det, Mix and the prior under each protocol; cDice per map."""
    names = outputs.box_class_names
    counts = result.localisation("all_images", "mix")["boxes"]
    rows = [["boxes", "-", "count", *[counts.get(name) for name in names], None]]  # the total: in the notes
    for protocol in PROTOCOLS:
        methods = [*MAP_NAMES, "prior"] + (["prior_other_fold"] if protocol == "two_fold" else [])
        for method in methods:
            summary = result.localisation(protocol, method)
            rows.append(
                ["IoU", PROTOCOL_SHORT[protocol], METHOD_TITLES[method], *_row_values(summary["iou"], names)]
            )
    for method in MAP_NAMES:
        summary = result.localisation("all_images", method)
        rows.append(["cDice", "threshold-free", METHOD_TITLES[method], *_row_values(summary["cdice"], names)])
    if _paper_rows_apply(outputs):
        rows += [["IoU", PAPER, METHOD_TITLES[m], *PAPER_IOU[m]] for m in MAP_NAMES]
        rows += [["cDice", PAPER, METHOD_TITLES[m], *PAPER_CDICE[m]] for m in MAP_NAMES]
    return Table(
        "table2_localisation",
        "Table 2. Localisation: mean IoU and cDice per class",
        ["Metric", "Protocol", "Method", *_class_columns(names)],
        rows,
        [
            f"{len(outputs.box_images)} test images with {len(outputs.gt_boxes)} boxes.",
            *[f"{PROTOCOL_SHORT[p]}: {PROTOCOL_TITLES[p]}." for p in PROTOCOLS],
            "Prior: no image at all; the mean box of the class (relative coordinates) predicts every box.",
            "cDice uses the whole map (min-max scaled), no threshold: the same under both protocols.",
            "Mean: over classes, each class weighing the same.",
        ],
    )


def _t_iou_rows(
    outputs: EvaluationOutputs, result: EvaluationResult, kappas: Sequence[float], with_paper: bool
) -> list[list]:
    names = outputs.box_class_names
    rows = []
    for kappa in kappas:
        key = f"{kappa:g}"
        for protocol in PROTOCOLS:
            methods = [*MAP_NAMES, "prior"] + (["prior_other_fold"] if protocol == "two_fold" else [])
            for method in methods:
                table = result.localisation(protocol, method)["t_iou"][key]
                rows.append(
                    [key, PROTOCOL_SHORT[protocol], METHOD_TITLES[method], *_row_values(table, names)]
                )
        if with_paper and kappa in PAPER_T_IOU:
            rows.append([key, PAPER, "Mix ('Ours')", *PAPER_T_IOU[kappa]])
    return rows


def table3(outputs: EvaluationOutputs, result: EvaluationResult) -> Table:
    """Table 3: T(IoU >= kappa) per class at kappa 0.3, 0.5, 0.6, both protocols, with the prior."""
    rows = _t_iou_rows(outputs, result, TABLE3_KAPPAS, _paper_rows_apply(outputs))
    return Table(
        "table3_t_iou",
        "Table 3. Localisation accuracy T(IoU >= kappa) per class",
        ["T(IoU)", "Protocol", "Method", *_class_columns(outputs.box_class_names)],
        rows,
        [
            "T(IoU >= kappa): the fraction of boxes whose predicted box reaches IoU kappa (a missed box: 0).",
            *[f"{PROTOCOL_SHORT[p]}: {PROTOCOL_TITLES[p]}." for p in PROTOCOLS],
        ],
    )


def table3_curve(outputs: EvaluationOutputs, result: EvaluationResult) -> Table:
    """T(IoU >= kappa) for every kappa of the evaluation (0.1 ... 0.7), both protocols, with the prior."""
    rows = _t_iou_rows(outputs, result, result.settings["kappas"], with_paper=False)
    return Table(
        "table3_t_iou_curve",
        "T(IoU >= kappa) for kappa = " + ", ".join(f"{k:g}" for k in result.settings["kappas"]),
        ["T(IoU)", "Protocol", "Method", *_class_columns(outputs.box_class_names)],
        rows,
        [f"{PROTOCOL_SHORT[p]}: {PROTOCOL_TITLES[p]}." for p in PROTOCOLS],
    )


def localisation_summary_json(outputs: EvaluationOutputs, result: EvaluationResult) -> dict:
    """Per protocol and method: per-class (and mean) IoU, T(IoU >= 0.3) and T(IoU >= 0.5); and the held-out check of Mix
    against the prior, class by class."""
    summary = {}
    for protocol in PROTOCOLS:
        summary[protocol] = {}
        for method in (*MAP_NAMES, "prior", *(["prior_other_fold"] if protocol == "two_fold" else [])):
            table = result.localisation(protocol, method)
            summary[protocol][method] = {
                "iou": table["iou"],
                **{f"t_iou_{k}": table["t_iou"][k] for k in ("0.3", "0.5") if k in table["t_iou"]},
            }
    mix = summary["two_fold"]["mix"]["iou"]
    prior = summary["two_fold"]["prior"]["iou"]
    summary["held_out_mix_vs_prior"] = {
        name: {
            "mix_iou": mix[name],
            "prior_iou": prior[name],
            "mix_beats_prior": bool(mix[name] > prior[name]),
        }
        for name in outputs.box_class_names
    }
    return as_plain(summary)


def held_out_check(outputs: EvaluationOutputs, result: EvaluationResult) -> str:
    """One Markdown paragraph: does Mix beat the prior under the held-out protocol, class by class?"""
    check = localisation_summary_json(outputs, result)["held_out_mix_vs_prior"]
    losing = [
        f"{name} (Mix {v['mix_iou']:.3f} vs prior {v['prior_iou']:.3f})"
        for name, v in check.items()
        if not v["mix_beats_prior"]
    ]
    winning = [name for name, v in check.items() if v["mix_beats_prior"]]
    text = (
        f"Held-out protocol: the Mix map's mean IoU beats the no-image prior (leave-one-out mean box) on "
        f"{len(winning)} of {len(check)} box classes"
    )
    return text + (f"; not on {', '.join(losing)}." if losing else ".")


def write_report(
    outputs: EvaluationOutputs,
    result: EvaluationResult,
    folder: str | Path,
    num_overlays: int = 8,
    overlay_map: str = "mix",
    provenance: dict | None = None,
) -> dict:
    """Write every report file (module docstring) to ``folder``.

    Args:
        outputs, result: the evaluation outputs and their scores.
        num_overlays: Fig. 3-style pictures to draw (0: none).
        overlay_map: the map shown and boxed in them.
        provenance: what produced the run (checkpoint, configs), shown at the top of report.md.

    Returns:
        {"tables": {name: [paths]}, "figures": [paths], "report": path, "summary": path}.
    """
    from custom.evaluation.plots import evaluation_overlays, roc_curves, t_iou_curves

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tables = [
        table1(outputs, result),
        table2(outputs, result),
        table3(outputs, result),
        table3_curve(outputs, result),
    ]
    written = {table.name: table.write(folder) for table in tables}
    figures = [
        roc_curves(outputs, result, folder / "roc_curves.png"),
        t_iou_curves(outputs, result, folder / "t_iou_curves.png"),
    ]
    if num_overlays > 0:
        sheet = evaluation_overlays(outputs, result, folder, num_overlays, overlay_map)
        figures += [sheet] if sheet is not None else []
    summary_path = write_json(folder / "summary.json", localisation_summary_json(outputs, result))
    lines = ["# RpSal evaluation report", ""]
    for key, value in (provenance or {}).items():
        lines.append(f"- {key}: `{value}`")
    lines += [
        f"- box rule: {result.settings['mode']} thresholds, component `{result.settings['component']}`, "
        f"connectivity {result.settings['connectivity']}; Det weighting `{outputs.weighting}`"
        f"{' (normalised)' if outputs.normalize and outputs.weighting != 'softmax' else ''}"
        f"{f', sharpness {outputs.sharpness:g}' if outputs.weighting == 'softmax' else ''}; "
        f"two-fold seed {result.settings['seed']}",
        "",
        "Every localisation number names its protocol:",
        "",
    ]
    lines += [f"- **{PROTOCOL_SHORT[p]}**: {PROTOCOL_TITLES[p]}." for p in PROTOCOLS]
    lines += ["", held_out_check(outputs, result), ""]
    for table in tables:
        lines += [table.markdown(), ""]
    lines += [f"![{figure.stem}]({figure.name})" for figure in figures]
    report = folder / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"tables": written, "figures": figures, "report": report, "summary": summary_path}
