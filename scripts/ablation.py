"""Ablation of the detection module's training on the CPU demo: variants x training seeds, scored held-out.

Each (variant, seed) trains the demo recipe (``train.yaml`` + ``demo.yaml`` + the variant's config files and
overrides) in its own ``<out_dir>/<variant>/seed<k>/`` (models/, logs/), then runs ``evaluating``
(``evaluate.yaml``) and reads the report's ``summary.json`` (held-out two-fold protocol: Sal / Det / Mix and
the leave-one-out prior, mean IoU, T(0.3), T(0.5), per-class Mix) and ``logs/test_metrics.jsonl`` (test mean
AUC of the image and the combined logits). The phantom and the split stay fixed; only ``seed`` changes.

Stages 2-3 are what the variants change. With ``--stage1_dir DIR`` a variant whose stage 1 is the default one
(``VARIANTS[name]["stage1"] == "default"``) starts from ``DIR/seed<k>/models/last.pt`` (a stage-1-only run of
the default recipe, made by ``stage1``) instead of retraining stage 1: the same stage-1 recipe and seed, so
the branch is the full run up to the random state of the data augmentation (MONAI's transform RNG is not in
the checkpoint), at a third of the CPU time. Without it every run trains all three stages.

Usage:
    python scripts/ablation.py stage1 --seeds 0,1,2 --out_dir runs/ablation/stage1
    python scripts/ablation.py run --variants default,mil --seeds 0,1,2 --out_dir runs/ablation \
        [--stage1_dir runs/ablation/stage1] [--dataset_dir DIR]
    python scripts/ablation.py rescore --variants mil --seeds 0 --out_dir runs/ablation   # evaluation only
    python scripts/ablation.py table --out_dir runs/ablation [--variants ...] > table.md
    python scripts/ablation.py variants        # what each variant changes

Run on a quiet machine (2 cores: a second heavy process slows training several-fold, see README).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TRAIN = [CONFIGS / "train.yaml", CONFIGS / "demo.yaml"]
EVALUATE = CONFIGS / "evaluate.yaml"
BOX_CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax"
)

# The detection-module settings every variant states in full, so that a row keeps its meaning whatever
# train.yaml's defaults are: these are the paper's (the estimator in train.yaml before issue 14).
PAPER_DETECTION = {
    "selection_estimator": "straight_through",
    "temperature_end": 0.001,
    "mil_weight": 0.0,
    "mil_sharpness": 5.0,
    "proposal_reduction": "max",
    "det_weighting": "sigmoid",
    "optimizer_groups": {},
}
# No detection training: stages 2 and 3 get no epochs, so the proposal head keeps its initialisation.
UNTRAINED = {"stages#1#epochs": 0, "stages#2#epochs": 0}
MIL = {"mil_weight": 1.0, "temperature_end": 1.0, "det_weighting": "softmax"}
HEAD_LR10 = {"optimizer_groups": {"proposal_head": {"lr_scale": 10.0}}}


def _variant(about: str, *settings: dict, **overrides) -> dict:
    """A variant: the paper's detection settings, then each dict of ``settings``, then ``overrides``."""
    merged = dict(PAPER_DETECTION)
    for part in settings:
        merged.update(part)
    return {"about": about, "overrides": {**merged, **overrides}, "stage1": "default"}


# name -> {"configs": extra config files merged after demo.yaml, "overrides": {id: value}, "stage1": "default"
# when stage 1 is the default recipe's (so a shared stage-1 checkpoint may start it), "about": one line}.
# Overrides go to monai.bundle as --id value; values are YAML-parsed by fire/monai.
VARIANTS: dict[str, dict] = {
    "paper_estimator": _variant("the paper's detection training in the demo recipe: ST Gumbel, tau 1 -> 0.001, "
                                "no MIL, max-pooled proposal features, sigmoid-weighted Det"),
    "untrained_head": _variant("no detection training: the stage-1 model, proposal head at its initialisation",
                               UNTRAINED),
    "untrained_head_softmax": _variant("as untrained_head, Det softmax-weighted (r=5)", UNTRAINED,
                                       det_weighting="softmax"),
    "untrained_head_mean": _variant("as untrained_head, mean-reduced proposal features", UNTRAINED,
                                    proposal_reduction="mean"),
    "untrained_head_contrast": _variant("as untrained_head, contrast-scored proposals", UNTRAINED,
                                        proposal_reduction="contrast"),
    "st_tau1": _variant("straight-through with tau held at 1 (the authors' code)", temperature_end=1.0),
    "mil_sigmoid_det": _variant("MIL term (LSE r=5, weight 1) + ST tau 1, Det sigmoid-weighted", MIL,
                                det_weighting="sigmoid"),
    "mil": _variant("MIL term (LSE r=5, weight 1) + ST tau 1, Det softmax-weighted (r=5)", MIL),
    "mil_reinforce": _variant("MIL + REINFORCE (4 samples, leave-one-out) instead of ST", MIL,
                              selection_estimator="reinforce"),
    "mil_mean": _variant("MIL + ST tau 1, mean-reduced proposal features", MIL, proposal_reduction="mean"),
    "mil_contrast": _variant("MIL + ST tau 1, contrast-scored proposals", MIL, proposal_reduction="contrast"),
    "mil50": _variant("MIL pooled near the max (LSE r=50) + ST tau 1, Det softmax r=50", MIL,
                      mil_sharpness=50.0),
    "mil50_contrast": _variant("MIL r=50 + ST tau 1, contrast-scored proposals, Det softmax r=50", MIL,
                               mil_sharpness=50.0, proposal_reduction="contrast"),
    "mil_head_lr10": _variant("MIL + ST tau 1, proposal head at 10 x the stage lr", MIL, HEAD_LR10),
    "mil_contrast_head_lr10": _variant("MIL + ST tau 1, contrast-scored proposals, proposal head at 10 x lr",
                                       MIL, HEAD_LR10, proposal_reduction="contrast"),
    "default": {
        "about": "train.yaml as shipped (the confirmation runs on seeds 3, 4, 5; full runs)",
        "overrides": {},
        "stage1": "own",
    },
    "paper": {
        "about": "bundle/configs/paper.yaml: the published method (paper text, authors' code where silent)",
        "configs": [CONFIGS / "paper.yaml"],
        "overrides": {},
        "stage1": "own",
    },
}


def _config_list(files) -> str:
    return "[" + ",".join(f"'{Path(f).relative_to(REPO)}'" for f in files) + "]"


def _override_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return args


def _bundle(entry: str, files, overrides: dict, log_path: Path) -> float:
    """Run ``python -m monai.bundle run ENTRY``; its output goes to LOG_PATH; returns the wall time (s)."""
    command = [sys.executable, "-m", "monai.bundle", "run", entry, "--config_file", _config_list(files),
               *_override_args(overrides)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    begin = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - begin
    if done.returncode:
        raise RuntimeError(f"{entry} failed with exit code {done.returncode}; see {log_path}")
    return seconds


def _parse_list(value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [v for v in str(value).split(",") if v]


def stage1(seeds="0,1,2", out_dir: str = "runs/ablation/stage1", dataset_dir: str | None = None) -> None:
    """Train only stage 1 of the default demo recipe per seed (stages 2-3 zero epochs) into OUT_DIR/seed<k>."""
    for seed in _parse_list(seeds):
        run_dir = Path(out_dir) / f"seed{seed}"
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        overrides = {"seed": int(seed), "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "logs"),
                     "stages#1#epochs": 0, "stages#2#epochs": 0, "training": ["$@train#trainer.run()"]}
        if dataset_dir:
            overrides["dataset_dir"] = dataset_dir
        seconds = _bundle("training", TRAIN, overrides, run_dir / "logs" / "ablation.log")
        print(f"stage 1, seed {seed}: {seconds:.0f} s -> {run_dir / 'models' / 'last.pt'}")


def run(variants="mil_reinforce", seeds="0,1,2", out_dir: str = "runs/ablation", stage1_dir: str | None = None,
        dataset_dir: str | None = None, rerun: bool = False) -> None:
    """Train and evaluate each variant x seed; each run's numbers go to <run>/ablation.json."""
    for name in _parse_list(variants):
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    for name in _parse_list(variants):
        variant = VARIANTS[name]
        for seed in _parse_list(seeds):
            run_dir = Path(out_dir) / name / f"seed{seed}"
            result_path = run_dir / "ablation.json"
            if result_path.exists() and not rerun:
                print(f"{name} seed {seed}: done before ({result_path})")
                continue
            models, logs = run_dir / "models", run_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            overrides = _run_overrides(run_dir, seed, variant, dataset_dir)
            branched_from = None
            if stage1_dir and variant.get("stage1") == "default":
                source = Path(stage1_dir) / f"seed{seed}" / "models" / "last.pt"
                if not source.exists():
                    raise FileNotFoundError(f"{source}: no stage-1 checkpoint for seed {seed}; run "
                                            f"`python scripts/ablation.py stage1 --seeds {seed} --out_dir {stage1_dir}`")
                models.mkdir(parents=True, exist_ok=True)
                if not (models / "last.pt").exists():
                    shutil.copy2(source, models / "last.pt")
                    # The stage-1 weights stand as model.pt until training writes its own (a variant without
                    # detection epochs evaluates them).
                    shutil.copy2(source.with_name("model.pt"), models / "model.pt")
                # The stage-1 checkpoint was written under the default recipe: continuing it under the
                # variant's stages 2-3 is the point.
                overrides["allow_config_change"] = True
                branched_from = str(source)
            files = [*TRAIN, *variant.get("configs", [])]
            train_seconds = _bundle("training", files, overrides, logs / "ablation.log")
            eval_seconds = _bundle("evaluating", [*files, EVALUATE], overrides, logs / "ablation.log")
            result = {"variant": name, "seed": int(seed), "branched_from_stage1": branched_from,
                      "train_seconds": round(train_seconds, 1), "evaluate_seconds": round(eval_seconds, 1),
                      **read_scores(run_dir)}
            result_path.write_text(json.dumps(result, indent=2) + "\n")
            print(f"{name} seed {seed}: {_one_line(result)}")


def _run_overrides(run_dir: Path, seed, variant: dict, dataset_dir: str | None) -> dict:
    """The ids one run sets: its seed and folders, the variant's overrides, and the data set if given."""
    overrides = {"seed": int(seed), "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "logs"),
                 **variant.get("overrides", {})}
    if dataset_dir:
        overrides["dataset_dir"] = dataset_dir
    return overrides


def rescore(variants, seeds="0,1,2", out_dir: str = "runs/ablation", dataset_dir: str | None = None) -> None:
    """Rerun only the evaluation of finished runs under the variant's current settings (e.g. another Det
    weighting of the same trained model); ablation.json keeps the training time and is rewritten."""
    for name in _parse_list(variants):
        variant = VARIANTS[name]
        for seed in _parse_list(seeds):
            run_dir = Path(out_dir) / name / f"seed{seed}"
            result_path = run_dir / "ablation.json"
            if not result_path.exists():
                raise FileNotFoundError(f"{result_path}: no finished run to rescore")
            before = json.loads(result_path.read_text())
            overrides = _run_overrides(run_dir, seed, variant, dataset_dir)
            files = [*TRAIN, *variant.get("configs", []), EVALUATE]
            eval_seconds = _bundle("evaluating", files, overrides, run_dir / "logs" / "ablation.log")
            result = {**before, "variant": name, "evaluate_seconds": round(eval_seconds, 1), **read_scores(run_dir)}
            result_path.write_text(json.dumps(result, indent=2) + "\n")
            print(f"{name} seed {seed} (rescored): {_one_line(result)}")


def read_scores(run_dir: Path) -> dict:
    """The held-out scores of one run from its report's summary.json and its test metrics."""
    summary = json.loads((Path(run_dir) / "logs" / "report" / "summary.json").read_text())
    held_out = summary["two_fold"]
    scores = {}
    for method in ("sal", "det", "mix", "prior"):
        for key in ("iou", "t_iou_0.3", "t_iou_0.5"):
            if key in held_out[method]:
                scores[f"{method}_{key}"] = held_out[method][key]["mean"]
    scores["mix_per_class"] = {c: held_out["mix"]["iou"][c] for c in BOX_CLASSES if c in held_out["mix"]["iou"]}
    scores["prior_per_class"] = {c: held_out["prior"]["iou"][c] for c in BOX_CLASSES
                                 if c in held_out["prior"]["iou"]}
    scores["mix_beats_prior"] = sum(v["mix_beats_prior"] for v in summary["held_out_mix_vs_prior"].values())
    rows = [json.loads(line) for line in (Path(run_dir) / "logs" / "test_metrics.jsonl").read_text().splitlines()
            if line.strip()]
    scores["test_mean_auc"] = rows[-1].get("test_mean_auc")
    scores["test_mean_auc_combined"] = rows[-1].get("test_mean_auc_combined")
    return scores


def _one_line(r: dict) -> str:
    return (f"Sal {r['sal_iou']:.3f} Det {r['det_iou']:.3f} Mix {r['mix_iou']:.3f} prior {r['prior_iou']:.3f} "
            f"Mix T(0.5) {r['mix_t_iou_0.5']:.3f} Sal T(0.5) {r['sal_t_iou_0.5']:.3f} Mix>prior "
            f"{r['mix_beats_prior']}/8 AUC {r['test_mean_auc']:.3f} ({r['train_seconds']:.0f} s)")


def bars(r: dict) -> dict[str, bool]:
    """Issue 14's acceptance bars for one run."""
    return {
        "det>prior": r["det_iou"] > r["prior_iou"],
        "mix>sal": r["mix_iou"] > r["sal_iou"],
        "mix>det": r["mix_iou"] > r["det_iou"],
        "mix>prior 7/8": r["mix_beats_prior"] >= 7,
        "mixT.5>=0.20": r["mix_t_iou_0.5"] >= 0.20,
        "mixT.5>=salT.5": r["mix_t_iou_0.5"] >= r["sal_t_iou_0.5"],
        "auc>=0.88": r["test_mean_auc"] >= 0.88,
    }


_COLUMNS = ("sal_iou", "det_iou", "mix_iou", "prior_iou", "sal_t_iou_0.3", "det_t_iou_0.3", "mix_t_iou_0.3",
            "sal_t_iou_0.5", "det_t_iou_0.5", "mix_t_iou_0.5")


def _row(label: str, seed: str, r: dict, met: str) -> str:
    values = " | ".join(f"{r.get(key, float('nan')):.3f}" for key in _COLUMNS)
    return (f"| {label} | {seed} | {values} | {r['mix_beats_prior']:.3g}/8 | "
            f"{r['mix_per_class'].get('Cardiomegaly', float('nan')):.3f} | {r['test_mean_auc']:.3f} | "
            f"{r['test_mean_auc_combined']:.3f} | {r['train_seconds']:.0f} | {met} |")


def table(out_dir: str = "runs/ablation", variants=None, seeds=None) -> None:
    """A Markdown table of the finished runs under OUT_DIR: one row per variant x seed, then, for a variant
    with several seeds, their mean (bars met there: the mean over the seeds of the bars each seed meets)."""
    results = [json.loads(p.read_text()) for p in Path(out_dir).glob("*/seed*/ablation.json")]
    if seeds is not None:
        wanted = {int(seed) for seed in _parse_list(seeds)}
        results = [r for r in results if r["seed"] in wanted]
    order = _parse_list(variants) if variants else sorted({r["variant"] for r in results})
    head = ("| variant | seed | Sal | Det | Mix | prior | Sal T(0.3) | Det T(0.3) | Mix T(0.3) | Sal T(0.5) | "
            "Det T(0.5) | Mix T(0.5) | Mix > prior | Mix Card | AUC y | AUC y+z | train s | bars met |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in order:
        runs = sorted((r for r in results if r["variant"] == name), key=lambda r: r["seed"])
        for r in runs:
            met = bars(r)
            lines.append(_row(name, str(r["seed"]), r, f"{sum(met.values())}/{len(met)}"))
        if len(runs) > 1:
            mean = {key: sum(r.get(key, float("nan")) for r in runs) / len(runs)
                    for key in (*_COLUMNS, "mix_beats_prior", "test_mean_auc", "test_mean_auc_combined",
                                "train_seconds")}
            mean["mix_per_class"] = {"Cardiomegaly": sum(r["mix_per_class"]["Cardiomegaly"] for r in runs)
                                     / len(runs)}
            met = [sum(bars(r).values()) for r in runs]
            lines.append(_row(f"**{name}**", f"mean of {len(runs)}", mean,
                              f"{sum(met) / len(runs):.1f}/7 per seed"))
    print("\n".join(lines))


def variants() -> None:
    """Print each variant and what it changes."""
    for name, variant in VARIANTS.items():
        extra = [str(Path(f).relative_to(REPO)) for f in variant.get("configs", [])]
        print(f"{name}: {variant['about']}\n    configs {extra} overrides {variant.get('overrides', {})}")


if __name__ == "__main__":
    fire.Fire({"stage1": stage1, "run": run, "rescore": rescore, "table": table, "variants": variants})
