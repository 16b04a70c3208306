"""What the localisation costs: RpSalNet against a plain DenseNet-121, side by side in one process (issue 7).

Usage (from the repository root)::

    python scripts/benchmark.py                                  # CPU: 512 px, train batch 2, fp32
    python scripts/benchmark.py --train_batch 8,32 --precision tf32,bf16 --channels_last True   # a GPU
    python scripts/benchmark.py --sections train,infer --repeats 3 --output ""                   # quick look

Sections (``--sections``, default all):
    train  training throughput (images/s) and peak memory of the full RpSalNet stage-3 step (forward, the
           stage-3 terms of the configured ``loss``, backward, the configured ``optimizer``) against a
           torchvision DenseNet-121 with a 14-way classifier (BCE, AdamW with the configured settings) at the
           same image size, batch and precision;
    infer  inference latency per image: the declared inference path of ``inference.yaml`` (its ``inferer``,
           then its ``postprocessing`` per image: Sal/Det/Mix maps, the box rule for the 14 classes, the
           findings document) against a DenseNet-121 forward, batch 1 and 8;
    deploy latency per image of the deployment exports (``custom.deployment``: network + Sal/Det/Mix maps)
           run eagerly, as the ``torch.export`` program (``model.pt2``) and as ONNX on onnxruntime
           (``model.onnx``, CPU), beside a DenseNet-121 forward, batch 1 and 8 (fp32);
    data   images/s of the input pipeline from PNG decoding and from the resized cache, with N workers
           (``scripts/benchmark_data.py``);
    parts  forward + backward time of each part of the RpSal training step, each run alone on the inputs it
           gets in a real step, so the next optimisation is chosen from data.

The network, loss, optimiser and inference path are built from the shipped configs through the bundle's
config parser (``bundle/configs/train.yaml`` and ``inference.yaml``; ``--network demo`` merges
``demo_network.yaml`` on both), so the benchmark measures what the bundle runs.
The two models' calls alternate (A, B, A, B, ...) so that a machine shared with other work slows both alike;
each table reports medians over ``--repeats`` timed calls after ``--warmup`` untimed ones. CUDA calls are
timed with CUDA events, CPU calls with ``time.perf_counter`` (wall) and ``time.process_time`` (CPU time of
the process, less sensitive to other processes on the machine). Peak memory: ``torch.cuda.max_memory_allocated``
above the memory held before the call on a GPU; on the CPU the peak of PyTorch's allocations during one call,
from ``torch.profiler``'s memory events. The load average before and after is recorded.
Results are printed and written to ``--output`` (default ``docs/benchmarks.md``) between the markers
``<!-- BEGIN GENERATED: scripts/benchmark.py -->`` and ``<!-- END GENERATED -->``: text outside them (notes)
is kept.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for folder in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import fire
import torch
import torch.nn.functional as F
import torchvision

from monai.bundle import ConfigParser
from monai.data import decollate_batch

from custom.labels import CLASS_NAMES
from custom.losses import RpSalLoss
from custom.networks.gumbel_selection import proposal_pooling, select_boxes
from custom.networks.rpsal import RpSalNet, RpSalOutput

BEGIN_MARK = "<!-- BEGIN GENERATED: scripts/benchmark.py -->"
END_MARK = "<!-- END GENERATED -->"
PRECISIONS = ("fp32", "tf32", "bf16")
SECTIONS = ("train", "infer", "data", "parts", "deploy")
NUM_CLASSES = len(CLASS_NAMES)
CONFIGS = REPO_ROOT / "bundle" / "configs"
NETWORKS = {"paper": [], "demo": [CONFIGS / "demo_network.yaml"]}
# Class prevalence for the class-balanced BCE weights; any value gives the same cost.
PREVALENCE = 0.05


def bundle_parser(config: str, network: str, device: torch.device, **overrides) -> ConfigParser:
    """The shipped ``config`` (train.yaml or inference.yaml) with the ``network`` sizes' fragment merged on it,
    on ``device``; ``overrides`` are config id -> value."""
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {sorted(NETWORKS)}, got {network!r}")
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / config), *(str(path) for path in NETWORKS[network])])
    parser["device"] = f"$torch.device('{device}')"
    for key, value in overrides.items():
        parser[key] = value
    return parser


# ---- timing ------------------------------------------------------------------------------------------------


class Clock:
    """Times calls on one device: CUDA events on a GPU (one synchronisation per timed call, after it),
    perf_counter and process_time on the CPU. ``time(fn)`` -> (wall seconds, CPU seconds or None)."""

    def __init__(self, device: torch.device):
        self.device = device

    def time(self, fn: Callable[[], object]) -> tuple[float, float | None]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0, None
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    clock: Clock, calls: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, dict]:
    """Run the calls in turn (``warmup`` untimed rounds, then ``repeats`` timed ones).

    Returns {name: {"wall": median s, "cpu": median CPU s or None, "walls": [s, ...]}}.
    """
    for _ in range(warmup):
        for fn in calls.values():
            clock.time(fn)
    walls: dict[str, list[float]] = {name: [] for name in calls}
    cpus: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            wall, cpu = clock.time(fn)
            walls[name].append(wall)
            if cpu is not None:
                cpus[name].append(cpu)
    return {
        name: {
            "wall": statistics.median(walls[name]),
            "cpu": statistics.median(cpus[name]) if cpus[name] else None,
            "walls": walls[name],
        }
        for name in calls
    }


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes a call allocates at its peak above what was held before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocations and frees of PyTorch's CPU allocator
    recorded by ``torch.profiler`` (``profile_memory``), summed in time order (each operator's own net
    allocation at its start, frees outside operators where they happen); the process's resident size would
    not do, as freed memory stays with the C allocator.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    changes = sorted(
        (
            event.time_range.start,
            event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage,
        )
        for event in prof.events()
    )
    peak = held = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return peak


# ---- models and steps --------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


def set_precision(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """Configure TF32 for ``precision`` and return a factory of the matching autocast context."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_models(device: torch.device, channels_last: bool, network: str = "paper",
                 seed: int = 0) -> tuple[RpSalNet, torch.nn.Module, ConfigParser]:
    """train.yaml's RpSalNet (the paper's sizes, or the demo's) and a torchvision DenseNet-121 with 14 outputs;
    returns them with the training config's parser (its loss and optimiser)."""
    torch.manual_seed(seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    parser = bundle_parser("train.yaml", network, device, channels_last=channels_last)
    rpsal = parser.get_parsed_content("network")
    densenet = torchvision.models.densenet121(num_classes=NUM_CLASSES).to(device, memory_format=memory_format)
    return rpsal, densenet, parser


def optimisers(parser: ConfigParser, densenet: torch.nn.Module):
    """train.yaml's ``optimizer`` for RpSalNet, and AdamW with the same settings for DenseNet-121."""
    settings = {key: parser.get_parsed_content(f"optimizer#{key}") for key in ("lr", "betas", "eps", "weight_decay")}
    return parser.get_parsed_content("optimizer"), torch.optim.AdamW(densenet.parameters(), **settings)


def make_inputs(device: torch.device, batch: int, size: int, channels_last: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = (torch.rand(batch, NUM_CLASSES, generator=generator) < 0.2).float()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, memory_format=memory_format), labels.to(device)


def rpsal_loss(parser: ConfigParser, device: torch.device) -> RpSalLoss:
    """train.yaml's ``loss`` at stage 3 (its terms and scale), with class weights of a fixed prevalence (the
    datalist's are not needed: any weights cost the same)."""
    parser["loss#positive_weights"] = [1 - PREVALENCE] * NUM_CLASSES
    parser["loss#negative_weights"] = [PREVALENCE] * NUM_CLASSES
    loss = parser.get_parsed_content("loss").to(device)
    loss.set_stage(3)
    return loss


def rpsal_train_step(net, loss, optimizer, images, labels, autocast) -> Callable[[], None]:
    """One stage-3 step: every parameter trains, both loss terms, AdamW. No host synchronisation inside."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            value = loss(net(images), labels)
        value.backward()
        optimizer.step()

    return step


def densenet_train_step(net, optimizer, images, labels, autocast) -> Callable[[], None]:
    """One step of the plain classifier: BCE with logits over the 14 labels, AdamW."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = net(images)
        F.binary_cross_entropy_with_logits(logits.float(), labels).backward()
        optimizer.step()

    return step


def rpsal_pipeline(net, images, autocast, inference: ConfigParser) -> Callable[[], list]:
    """inference.yaml's inferer, then its postprocessing per image (maps, boxes of the 14 classes by the box
    rule, the findings document), for 1024-px originals and the default thresholds (no file)."""
    inferer = inference.get_parsed_content("inferer")
    postprocessing = inference.get_parsed_content("postprocessing")
    sizes = torch.tensor([1024, 1024])

    def run():
        with autocast():
            outputs = inferer(images, net)
        return [postprocessing({"image": images[b], "original_size": sizes, "image_path": "benchmark.png",
                                "pred": pred}) for b, pred in enumerate(decollate_batch(outputs))]

    return run


def densenet_forward(net, images, autocast) -> Callable[[], torch.Tensor]:
    """The plain classifier's probabilities, brought to the host as the pipeline's boxes are."""

    def run():
        with torch.no_grad(), autocast():
            return torch.sigmoid(net(images).float()).cpu()

    return run


def count_host_syncs(step: Callable[[], object], device: torch.device) -> int | None:
    """Synchronising CUDA calls made by one step (torch.cuda.set_sync_debug_mode); None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# ---- parts of the RpSal step -------------------------------------------------------------------------------


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().requires_grad_(True)


def rpsal_part_calls(
    net: RpSalNet, loss, optimizer, images, labels, autocast
) -> dict[str, Callable[[], None]]:
    """Forward + backward of each part of the stage-3 step alone, on the inputs a real step gives it.

    Parts: backbone + FPN; saliency heads + LSE pooling; proposal pooling (RoIAlign of class features and
    saliency); proposal head (gating, 3x3 conv, scores, box refinement); Gumbel selection + crop; crop
    classifier (ResNet-34); losses; AdamW step.
    """
    size = tuple(images.shape[-2:])
    head = net.proposal_head
    with autocast():
        pyramid = net.fpn(images)
        class_features, saliency_logits = net.saliency_head(pyramid)
        proposals = net.proposals(size, images.device)
        pooled, pooled_saliency = head.pool(class_features, saliency_logits, proposals, size)
        logits, refined = head.score(pooled, pooled_saliency, proposals, size)
        selection = net.selector(logits, net.temperature)
        crops = net.crop(images, select_boxes(selection, refined))
        crop_logits = net.crop_classifier(crops)
        image_logits = net.lse_pooling(saliency_logits)
        proposal_image_logits = proposal_pooling(logits, net.mil_sharpness)
    pyramid, class_features, saliency_logits = map(_leaf, (pyramid, class_features, saliency_logits))
    pooled, pooled_saliency, logits, refined = map(_leaf, (pooled, pooled_saliency, logits, refined))
    crops, crop_logits, image_logits = map(_leaf, (crops, crop_logits, image_logits))
    proposal_image_logits = _leaf(proposal_image_logits)

    def part(fn: Callable[[], Iterable[torch.Tensor]]) -> Callable[[], None]:
        # Random upstream gradients of each output's shape, dtype and layout, drawn once (not timed).
        with autocast():
            upstream = [torch.randn_like(o) for o in fn() if o.requires_grad]

        def run():
            with autocast():
                outputs = [o for o in fn() if o.requires_grad]
            torch.autograd.backward(outputs, upstream)

        return run

    def losses():
        with autocast():
            output = RpSalOutput(image_logits, saliency_logits, combined_logits=image_logits + crop_logits,
                                 proposal_image_logits=proposal_image_logits)
            value = loss(output, labels)
        value.backward()

    def saliency_heads():
        features, saliency = net.saliency_head(pyramid)
        return features, saliency, net.lse_pooling(saliency)

    return {
        "backbone + FPN": part(lambda: [net.fpn(images)]),
        "saliency heads + LSE": part(saliency_heads),
        "proposal pooling": part(lambda: head.pool(class_features, saliency_logits, proposals, size)),
        "proposal head (gate, conv, boxes)": part(
            lambda: head.score(pooled, pooled_saliency, proposals, size)
        ),
        "Gumbel selection + crop": part(
            lambda: [net.crop(images, select_boxes(net.selector(logits, net.temperature), refined))]
        ),
        "crop classifier (ResNet-34)": part(lambda: [net.crop_classifier(crops)]),
        "losses": losses,
        "AdamW step": optimizer.step,
    }


# ---- sections ----------------------------------------------------------------------------------------------


def _as_list(value, cast) -> list:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        value = [value]
    return [cast(v.strip() if isinstance(v, str) else v) for v in value]


def train_section(
    device, size, batches, precisions, channels_last, repeats, warmup, with_parts, network="paper"
) -> list[dict]:
    """Rows {precision, batch, rpsal/densenet timings and memory, ratio, syncs, parts}."""
    rows = []
    for precision in precisions:
        autocast = set_precision(device, precision)
        for batch in batches:
            rpsal, densenet, parser = build_models(device, channels_last, network)
            rpsal.train()
            densenet.train()
            images, labels = make_inputs(device, batch, size, channels_last)
            loss = rpsal_loss(parser, device)
            rpsal_opt, densenet_opt = optimisers(parser, densenet)
            calls = {
                "rpsal": rpsal_train_step(rpsal, loss, rpsal_opt, images, labels, autocast),
                "densenet": densenet_train_step(densenet, densenet_opt, images, labels, autocast),
            }
            times = interleaved(Clock(device), calls, repeats, warmup)
            row = {
                "precision": precision,
                "batch": batch,
                "times": times,
                "memory": {name: peak_memory(fn, device) for name, fn in calls.items()},
                "syncs": count_host_syncs(calls["rpsal"], device),
            }
            if with_parts:
                parts = rpsal_part_calls(rpsal, loss, rpsal_opt, images, labels, autocast)
                row["parts"] = interleaved(Clock(device), parts, repeats, warmup)
            rows.append(row)
            _print_train_row(row, size)
            del rpsal, densenet, rpsal_opt, densenet_opt, calls
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def infer_section(device, size, batches, precisions, channels_last, repeats, warmup, network="paper") -> list[dict]:
    rows = []
    rpsal, densenet, _ = build_models(device, channels_last, network)
    inference = bundle_parser("inference.yaml", network, device, thresholds_file=None, image_size=size)
    rpsal.eval()
    densenet.eval()
    for precision in precisions:
        autocast = set_precision(device, precision)
        for batch in batches:
            images, _ = make_inputs(device, batch, size, channels_last)
            calls = {
                "rpsal": rpsal_pipeline(rpsal, images, autocast, inference),
                "densenet": densenet_forward(densenet, images, autocast),
            }
            row = {
                "precision": precision,
                "batch": batch,
                "times": interleaved(Clock(device), calls, repeats, warmup),
            }
            rows.append(row)
            _print_infer_row(row, size)
    return rows


def deploy_section(device, size, batches, repeats, warmup, network="paper") -> list[dict]:
    """Rows {batch, times of eager / pt2 / onnx / densenet}: the exports of ``custom.deployment``."""
    import tempfile

    import onnxruntime

    from custom.deployment.exported_model import RpSalMapsModel, export_onnx, export_program

    rpsal, densenet, _ = build_models(device, False, network)
    inference = bundle_parser("inference.yaml", network, device, thresholds_file=None, image_size=size)
    thresholds = inference.get_parsed_content("thresholds")
    model = RpSalMapsModel(rpsal.eval(), size, thresholds.weighting, thresholds.normalize, thresholds.sharpness)
    program = export_program(model).module()
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = export_onnx(model, Path(folder) / "model.onnx")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    densenet.eval()
    rows = []
    for batch in batches:
        images, _ = make_inputs(device, batch, size, False)
        feed = {"images": images.cpu().numpy()}

        def torch_call(module):
            def run():
                with torch.no_grad():
                    return module(images)
            return run

        calls = {"eager": torch_call(model), "pt2": torch_call(program),
                 "onnx": lambda: session.run(None, feed), "densenet": torch_call(densenet)}
        row = {"batch": batch, "times": interleaved(Clock(device), calls, repeats, warmup)}
        rows.append(row)
        print(f"deploy, batch {batch}: " + ", ".join(
            f"{name} {_ms(_per_image(row, name))} ms/image" for name in calls), flush=True)
    return rows


def data_section(image_dir: str, size: int, workers: int, batch: int, repeat: int) -> dict:
    from benchmark_data import benchmark as data_benchmark

    return {**data_benchmark(image_dir, size, workers, batch, repeat), "workers": workers, "batch": batch}


# ---- report ------------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _rates(row: dict) -> tuple[float, float]:
    """Images/s of RpSal and DenseNet in a training row."""
    t, b = row["times"], row["batch"]
    return b / t["rpsal"]["wall"], b / t["densenet"]["wall"]


def _per_image(row: dict, model: str, clock: str = "wall") -> float:
    return row["times"][model][clock] / row["batch"]


def _print_train_row(row: dict, size: int) -> None:
    rpsal, densenet = _rates(row)
    print(
        f"[train] {row['precision']} batch {row['batch']} {size}px: RpSal {rpsal:.2f} img/s, "
        f"DenseNet {densenet:.2f} img/s, ratio {rpsal / densenet:.3f}",
        flush=True,
    )


def _print_infer_row(row: dict, size: int) -> None:
    rpsal, densenet = _per_image(row, "rpsal"), _per_image(row, "densenet")
    print(
        f"[infer] {row['precision']} batch {row['batch']} {size}px: pipeline {_ms(rpsal)} ms/img, "
        f"DenseNet {_ms(densenet)} ms/img, ratio {rpsal / densenet:.2f}",
        flush=True,
    )


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def _train_table(rows: list[dict], cpu: bool) -> list[str]:
    cpu_head, cpu_rule = (" RpSal CPU s | DenseNet CPU s |", "---|---|") if cpu else ("", "")
    lines = [
        "### Training step (stage 3: all parameters, all losses, AdamW)",
        "",
        (
            "| precision | batch | RpSal img/s | DenseNet-121 img/s | RpSal / DenseNet throughput | RpSal ms/step |"
            f" DenseNet ms/step |{cpu_head} RpSal peak MiB | DenseNet peak MiB | host syncs in an RpSal step |"
        ),
        f"|---|---|---|---|---|---|---|{cpu_rule}---|---|---|",
    ]
    for row in rows:
        t, memory = row["times"], row["memory"]
        rpsal, densenet = _rates(row)
        cpu_cols = f" {t['rpsal']['cpu']:.2f} | {t['densenet']['cpu']:.2f} |" if cpu else ""
        syncs = "n/a (CPU)" if row["syncs"] is None else str(row["syncs"])
        lines.append(
            f"| {row['precision']} | {row['batch']} | {rpsal:.2f} | {densenet:.2f} | **{rpsal / densenet:.3f}x** | "
            f"{_ms(t['rpsal']['wall'])} | {_ms(t['densenet']['wall'])} |{cpu_cols} {_mib(memory['rpsal'])} | "
            f"{_mib(memory['densenet'])} | {syncs} |"
        )
    source = "`torch.profiler`'s memory events" if cpu else "`torch.cuda.max_memory_allocated`"
    lines += [
        "",
        (
            f"Peak memory: what one step allocates at its peak above what is held before it (activations, "
            f"gradients, temporaries; weights and optimizer state are held before), from {source}."
        ),
        "",
    ]
    return lines


def _infer_table(rows: list[dict], cpu: bool) -> list[str]:
    cpu_head = " pipeline CPU ms/image | DenseNet CPU ms/image | ratio of CPU times |" if cpu else ""
    lines = [
        "### Inference per image: RpSal pipeline (model + Mix map + 14 boxes) vs DenseNet-121 forward",
        "",
        f"| precision | batch | pipeline ms/image | DenseNet-121 ms/image | pipeline / DenseNet |{cpu_head}",
        "|---|---|---|---|---|" + ("---|---|---|" if cpu else ""),
    ]
    for row in rows:
        rpsal, densenet = _per_image(row, "rpsal"), _per_image(row, "densenet")
        cpu_cols = ""
        if cpu:
            rpsal_cpu, densenet_cpu = _per_image(row, "rpsal", "cpu"), _per_image(row, "densenet", "cpu")
            cpu_cols = f" {_ms(rpsal_cpu)} | {_ms(densenet_cpu)} | {rpsal_cpu / densenet_cpu:.2f}x |"
        lines.append(
            f"| {row['precision']} | {row['batch']} | {_ms(rpsal)} | {_ms(densenet)} | "
            f"**{rpsal / densenet:.2f}x** |{cpu_cols}"
        )
    return lines + [""]


def _deploy_table(rows: list[dict]) -> list[str]:
    lines = [
        "### Deployment exports per image: network + Sal/Det/Mix maps, eager vs torch.export vs ONNX Runtime",
        "",
        "| batch | eager ms/image | model.pt2 ms/image | model.onnx (onnxruntime) ms/image | DenseNet-121 ms/image | "
        "onnx / eager |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        eager, pt2, onnx, densenet = (_per_image(row, name) for name in ("eager", "pt2", "onnx", "densenet"))
        lines.append(f"| {row['batch']} | {_ms(eager)} | {_ms(pt2)} | {_ms(onnx)} | {_ms(densenet)} | "
                     f"**{onnx / eager:.2f}x** |")
    return lines + ["", "Boxes are not in these times (``custom.localisation.BoxRule`` on the maps: about 10 ms "
                    "for 14 classes, see above).", ""]


def _parts_table(row: dict) -> list[str]:
    parts = row["parts"]
    total = sum(p["wall"] for p in parts.values())
    lines = [
        (
            f"### Parts of the RpSal training step ({row['precision']}, batch {row['batch']}): forward + backward of "
            "each part alone"
        ),
        "",
        "| part | ms | share |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {_ms(p['wall'])} | {100 * p['wall'] / total:.0f}% |" for name, p in parts.items()]
    return lines + [
        f"| sum of the parts | {_ms(total)} | |",
        f"| whole step (above) | {_ms(row['times']['rpsal']['wall'])} | |",
        "",
    ]


def _data_table(d: dict) -> list[str]:
    return [
        "### Input pipeline (load + resize to the training size)",
        "",
        "| source | images/s |",
        "|---|---|",
        f"| PNG decoding | {d['png_images_per_s']} |",
        f"| resized cache (.npy) | {d['cache_images_per_s']} |",
        f"| cache / PNG | **{d['speedup']}x** |",
        "",
        f"{d['images']} images ({d['source']}), {d['workers']} workers, batch {d['batch']}.",
        "",
    ]


def render(results: dict) -> str:
    """The generated Markdown block: settings, then the table of each section that ran."""
    s = results["settings"]
    layout = "channels-last" if s["channels_last"] else "contiguous"
    lines = [
        BEGIN_MARK,
        "",
        f"## Results of `{s['command']}`",
        "",
        f"- date: {s['date']}",
        f"- device: {s['device']}",
        f"- torch {s['torch']}, torchvision {s['torchvision']}, Python {s['python']}",
        (
            f"- image size {s['image_size']} px, memory format {layout}, repeats {s['repeats']} (median) after "
            f"{s['warmup']} warm-up round(s), the two models alternating"
        ),
        f"- load average (1, 5, 15 min) before / after: {s['load_before']} / {s['load_after']}",
        "",
    ]
    cpu = s["device_type"] == "cpu"
    if results.get("train"):
        lines += _train_table(results["train"], cpu)
    if results.get("infer"):
        lines += _infer_table(results["infer"], cpu)
    for row in results.get("train", []):
        if "parts" in row:
            lines += _parts_table(row)
    if results.get("deploy"):
        lines += _deploy_table(results["deploy"])
    if results.get("data"):
        lines += _data_table(results["data"])
    lines.append(END_MARK)
    return "\n".join(lines)


def write_report(path: Path, block: str) -> None:
    """Replace the generated block of ``path`` (creating the file if needed), keeping the text around it."""
    if path.exists():
        text = path.read_text()
        if BEGIN_MARK in text and END_MARK in text:
            head, rest = text.split(BEGIN_MARK, 1)
            text = head + block + rest.split(END_MARK, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = f"# Benchmarks\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def benchmark(
    sections: str | tuple = ",".join(SECTIONS),
    device: str = "auto",
    image_size: int = 512,
    train_batch: int | str | tuple | None = None,
    infer_batch: int | str | tuple = (1, 8),
    precision: str | tuple = "fp32",
    channels_last: bool = False,
    repeats: int | None = None,
    warmup: int = 1,
    threads: int | None = None,
    data_dir: str = str(REPO_ROOT / "tests" / "data" / "nih_sample" / "images"),
    data_workers: int = 2,
    data_batch: int = 8,
    # 4 sample PNGs x 64 = 256 images: ~0.4 s from the cache, long enough to be timed steadily.
    data_repeat: int = 64,
    output: str = str(REPO_ROOT / "docs" / "benchmarks.md"),
    network: str = "paper",
) -> dict:
    """Run the benchmark; prints the tables, writes ``output`` (empty string: don't) and returns the results.

    Args:
        sections: any of train, infer, data, parts (comma-separated).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``.
        image_size: square input side in pixels (multiple of 32).
        train_batch: training batch size(s), e.g. ``8,32`` (default 8 on a GPU, 2 on the CPU).
        infer_batch: inference batch size(s).
        precision: fp32, tf32 (CUDA TF32 matmuls and convs), bf16 (autocast), or several comma-separated.
        channels_last: both models and inputs in channels-last memory format.
        repeats: timed calls per model (default 20 on a GPU, 5 on the CPU); warmup: untimed rounds before.
        threads: torch CPU threads (default: torch's).
        data_dir, data_workers, data_batch, data_repeat: the data section (``scripts/benchmark_data.py``).
        network: "paper" (the shipped configs' sizes) or "demo" (``demo_network.yaml`` merged on them).
    """
    sections = _as_list(sections, str)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {SECTIONS}")
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    train_batches = _as_list(train_batch if train_batch is not None else (8 if on_gpu else 2), int)
    infer_batches = _as_list(infer_batch, int)
    precisions = _as_list(precision, str)
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"precision must be among {PRECISIONS}, got {p!r}")
    repeats = int(repeats) if repeats else (20 if on_gpu else 5)
    settings = {
        "command": " ".join(["python scripts/benchmark.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_description(dev),
        "device_type": dev.type,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "image_size": image_size,
        "network": network,
        "channels_last": channels_last,
        "repeats": repeats,
        "warmup": warmup,
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    print(
        f"{settings['device']}; torch {settings['torch']}; load average {settings['load_before']}", flush=True
    )
    results: dict = {"settings": settings}
    if "train" in sections or "parts" in sections:
        results["train"] = train_section(
            dev,
            image_size,
            train_batches,
            precisions,
            channels_last,
            repeats,
            warmup,
            with_parts="parts" in sections,
            network=network,
        )
    if "infer" in sections:
        results["infer"] = infer_section(
            dev, image_size, infer_batches, precisions, channels_last, repeats, warmup, network
        )
    if "deploy" in sections:
        results["deploy"] = deploy_section(dev, image_size, infer_batches, repeats, warmup, network)
    if "data" in sections:
        results["data"] = data_section(data_dir, image_size, data_workers, data_batch, data_repeat)
        results["data"]["source"] = os.path.relpath(data_dir, REPO_ROOT)
    settings["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    block = render(results)
    print(block)
    if output:
        write_report(Path(output), block)
        print(f"written to {output}")
    return results


@functools.wraps(benchmark)
def main(*args, **kwargs) -> None:
    """Command-line entry: ``benchmark`` without echoing its returned results."""
    benchmark(*args, **kwargs)


if __name__ == "__main__":
    fire.Fire(main)
