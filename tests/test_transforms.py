"""LoadChestXrayd / read_grey_image on real NIH PNGs and a real chest DICOM, error cases, the MONAI chains
(resize + ImageNet normalisation, the paper's augmentation) as YAML, and exact box mapping."""

from __future__ import annotations

import copy
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, RandFlipd, Resized
from PIL import Image

from custom.transforms import (
    ImageLoadError,
    LoadChestXrayd,
    boxes_to_model,
    boxes_to_original,
    clip_boxes,
    read_grey_image,
    read_png_header,
)

SAMPLE = Path(__file__).parent / "data" / "nih_sample" / "images"
RGBA_SAMPLES = ("00001369_000.png", "00002578_000.png")
GREY_SAMPLES = ("00000147_001.png", "00004994_000.png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def chest_dicom() -> pydicom.Dataset:
    """The real MONOCHROME1 15-bit chest CR from pydicom-data."""
    return pydicom.dcmread(pydicom.data.get_testdata_file("RG1_UNCR.dcm"))


@pytest.fixture(scope="module")
def grey_crop() -> np.ndarray:
    """A 256x256 uint8 crop of a real L-mode NIH PNG (centre of the chest), for format-equivalence tests."""
    array = np.asarray(Image.open(SAMPLE / GREY_SAMPLES[0]))
    return np.ascontiguousarray(array[384:640, 384:640])


def strip_means(image: np.ndarray) -> tuple[float, float, float]:
    """Mean of the central vertical strip (40-60% of the width: spine, mediastinum) and the two lateral strips
    (15-30% and 70-85%: the lungs) of an (H, W) image."""
    width = image.shape[1]
    cut = lambda a, b: float(image[:, int(a * width) : int(b * width)].mean())  # noqa: E731
    return cut(0.40, 0.60), cut(0.15, 0.30), cut(0.70, 0.85)


def crop_dicom(ds: pydicom.Dataset, size: int = 256) -> pydicom.Dataset:
    """A copy of ``ds`` with its pixel data cropped to the central size x size block (fast to write/read)."""
    out = copy.deepcopy(ds)
    array = ds.pixel_array
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    out.PixelData = np.ascontiguousarray(array[top : top + size, left : left + size]).tobytes()
    out.Rows, out.Columns = size, size
    return out


def with_sbit(png_bytes: bytes, bits: int) -> bytes:
    """Insert an sBIT chunk (grey, ``bits`` significant bits) right after the IHDR chunk of a PNG."""
    ihdr_end = 8 + 8 + 13 + 4
    chunk = struct.pack(">I4sB", 1, b"sBIT", bits) + struct.pack(">I", zlib.crc32(b"sBIT" + bytes([bits])))
    return png_bytes[:ihdr_end] + chunk + png_bytes[ihdr_end:]


# ---------------------------------------------------------------- real PNGs


@pytest.mark.parametrize("name", RGBA_SAMPLES + GREY_SAMPLES)
def test_real_nih_png_loads_as_one_channel(name):
    mode = Image.open(SAMPLE / name).mode
    assert mode == ("RGBA" if name in RGBA_SAMPLES else "L")
    data = LoadChestXrayd("image")({"image": str(SAMPLE / name)})
    image = data["image"]
    assert isinstance(image, MetaTensor)
    assert image.shape == (1, 1024, 1024) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert data["original_size"] == [1024, 1024] and image.meta["original_size"] == [1024, 1024]
    assert image.meta["filename_or_obj"] == str(SAMPLE / name)
    # Rows stay rows: the tensor equals the file's first channel / 255, untransposed.
    expected = np.asarray(Image.open(SAMPLE / name))
    expected = expected[..., 0] if expected.ndim == 3 else expected
    np.testing.assert_allclose(image[0].numpy(), expected / 255.0, atol=1e-7)


@pytest.mark.parametrize("name", RGBA_SAMPLES + GREY_SAMPLES)
def test_real_png_spine_brighter_than_lungs(name):
    centre, left, right = strip_means(read_grey_image(SAMPLE / name).array)
    assert centre > left and centre > right, (centre, left, right)


def test_real_monochrome1_dicom_is_bone_bright(chest_dicom):
    path = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    assert chest_dicom.PhotometricInterpretation == "MONOCHROME1" and chest_dicom.BitsStored == 15
    data = LoadChestXrayd("image")({"image": path})
    image = data["image"]
    assert image.shape == (1, 1955, 1841) and image.dtype == torch.float32
    assert data["original_size"] == [1955, 1841]
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    centre, left, right = strip_means(image[0].numpy())
    assert centre > left and centre > right, (centre, left, right)


# ---------------------------------------------------------------- PNG modes and bit depths


def test_png_modes_and_16bit_agree(tmp_path, grey_crop):
    reference = grey_crop / np.float32(255)
    alpha = np.full_like(grey_crop, 255)
    variants = {
        "l.png": Image.fromarray(grey_crop, "L"),
        "la.png": Image.fromarray(np.stack([grey_crop, alpha], -1), "LA"),
        "rgb.png": Image.fromarray(np.stack([grey_crop] * 3, -1), "RGB"),
        "rgba.png": Image.fromarray(np.stack([grey_crop] * 3 + [alpha], -1), "RGBA"),
        "p.png": Image.fromarray(grey_crop, "L").convert("P"),
        "i16.png": Image.fromarray(grey_crop.astype(np.uint16) * 257),  # 8 -> 16 bit exactly
    }
    for name, image in variants.items():
        image.save(tmp_path / name)
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    for name in variants:
        grey = read_grey_image(tmp_path / name)
        np.testing.assert_allclose(grey.array, reference, atol=1e-6, err_msg=name)
    assert read_grey_image(tmp_path / "i16.png").bit_depth == 16
    assert read_grey_image(tmp_path / "l.png").bit_depth == 8


def test_16bit_png_with_12_significant_bits(tmp_path, grey_crop):
    """12-bit data stored unscaled in a 16-bit PNG that says so (sBIT 12) spans [0, 1], not [0, 1/16]."""
    twelve = np.rint(grey_crop.astype(np.float64) * 4095 / 255).astype(np.uint16)
    Image.fromarray(twelve).save(tmp_path / "unscaled.png")
    (tmp_path / "sbit.png").write_bytes(with_sbit((tmp_path / "unscaled.png").read_bytes(), 12))
    assert read_png_header(tmp_path / "sbit.png").significant_bits == 12
    np.testing.assert_allclose(read_grey_image(tmp_path / "sbit.png").array, twelve / 4095.0, atol=1e-6)
    # Without sBIT the PNG spec's full range applies.
    np.testing.assert_allclose(read_grey_image(tmp_path / "unscaled.png").array, twelve / 65535.0, atol=1e-7)


def test_downscale_on_load_is_an_exact_block_mean(tmp_path):
    grey = read_grey_image(SAMPLE / GREY_SAMPLES[0])
    reduced = read_grey_image(SAMPLE / GREY_SAMPLES[0], downscale_to=300)
    assert reduced.reduction == 3 or reduced.reduction == 2  # largest divisor of 1024 keeping >= 300 px
    factor = reduced.reduction
    assert reduced.original_size == (1024, 1024) and reduced.array.shape == (1024 // factor,) * 2
    expected = grey.array.reshape(1024 // factor, factor, 1024 // factor, factor).mean(axis=(1, 3))
    np.testing.assert_allclose(reduced.array, expected, atol=1e-6)
    data = LoadChestXrayd("image", downscale_to=512)({"image": str(SAMPLE / GREY_SAMPLES[0])})
    assert data["image"].shape == (1, 512, 512) and data["original_size"] == [1024, 1024]


def test_very_large_png_loads_with_bounded_memory(tmp_path):
    """A 12000x12000 film: no decompression-bomb refusal, and no float64 copy (peak <= ~6 bytes/pixel)."""
    side = 12000
    row = (np.arange(side) % 251).astype(np.uint8)
    Image.fromarray(np.broadcast_to(row, (side, side)).copy()).save(tmp_path / "big.png", compress_level=1)
    tracemalloc.start()
    try:
        grey = read_grey_image(tmp_path / "big.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grey.array.shape == (side, side) and grey.array.dtype == np.float32
    assert grey.array[5, 250] == pytest.approx(250 / 255)
    assert peak <= 6 * side * side, f"peak {peak / 2**20:.0f} MiB: a float64 copy would need >= 13 bytes/px"
    del grey
    tracemalloc.start()
    try:
        small = read_grey_image(tmp_path / "big.png", downscale_to=512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert small.array.shape == (600, 600) and small.original_size == (side, side)
    assert peak <= 3 * side * side


# ---------------------------------------------------------------- DICOM pipeline


def test_dicom_photometric_rescale_and_window(tmp_path, chest_dicom):
    base = crop_dicom(chest_dicom)
    base.save_as(tmp_path / "mono1.dcm")
    mono1 = read_grey_image(tmp_path / "mono1.dcm").array
    stored = base.pixel_array.astype(np.float64)

    mono2 = copy.deepcopy(base)
    mono2.PhotometricInterpretation = "MONOCHROME2"
    mono2.save_as(tmp_path / "mono2.dcm")
    np.testing.assert_allclose(read_grey_image(tmp_path / "mono2.dcm").array, 1.0 - mono1, atol=1e-6)

    # The same window expressed after a rescale (slope 2, intercept -100) gives the same picture.
    rescaled = copy.deepcopy(base)
    rescaled.RescaleSlope, rescaled.RescaleIntercept = 2, -100
    rescaled.WindowCenter, rescaled.WindowWidth = 2 * 15000 - 100, 2 * 30000
    rescaled.save_as(tmp_path / "rescaled.dcm")
    np.testing.assert_allclose(read_grey_image(tmp_path / "rescaled.dcm").array, mono1, atol=1e-4)

    # No VOI: the stored range 0..2**15-1 is the grey range (inverted for MONOCHROME1).
    no_window = copy.deepcopy(base)
    del no_window.WindowCenter, no_window.WindowWidth
    no_window.save_as(tmp_path / "no_window.dcm")
    np.testing.assert_allclose(
        read_grey_image(tmp_path / "no_window.dcm").array, 1 - stored / 32767, atol=1e-6
    )

    # A narrow window saturates: values beyond it clip to 0 or 1, those inside spread over [0, 1].
    narrow = copy.deepcopy(no_window)
    narrow.WindowCenter, narrow.WindowWidth = float(np.median(stored)), 2000
    narrow.save_as(tmp_path / "narrow.dcm")
    windowed = read_grey_image(tmp_path / "narrow.dcm").array
    assert windowed.min() == 0.0 and windowed.max() == 1.0
    assert np.all(windowed[stored > np.median(stored) + 1000] == 0.0)  # MONOCHROME1: high stored = dark


# ---------------------------------------------------------------- errors name the file


def test_error_cases_raise_image_load_error_naming_the_file(tmp_path, chest_dicom, grey_crop):
    cases: dict[str, tuple[Path, str]] = {}
    (tmp_path / "empty.png").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.png", "empty")
    png = (SAMPLE / GREY_SAMPLES[0]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 3])
    cases["truncated"] = (tmp_path / "truncated.png", "truncated")
    corrupt = bytearray(png)
    corrupt[len(png) // 2 : len(png) // 2 + 64] = bytes(64)  # zeroed inside IDAT: CRC / zlib failure
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    cases["corrupt"] = (tmp_path / "corrupt.png", "corrupt")
    (tmp_path / "text.png").write_text("<html><body>404 Not Found</body></html>\n")
    cases["text"] = (tmp_path / "text.png", "text")
    Image.fromarray(grey_crop[:16, :16]).save(tmp_path / "tiny.png")
    cases["too small"] = (tmp_path / "tiny.png", "minimum of 32")
    rgba = np.stack([grey_crop] * 3 + [np.full_like(grey_crop, 128)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    cases["transparent"] = (tmp_path / "transparent.png", "transparent")
    no_pixels = crop_dicom(chest_dicom, 64)
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "no_pixels.dcm")
    cases["no pixel data"] = (tmp_path / "no_pixels.dcm", "no pixel data")
    multi = crop_dicom(chest_dicom, 64)
    multi.NumberOfFrames = 2
    multi.PixelData = multi.PixelData * 2
    multi.save_as(tmp_path / "multi.dcm")
    cases["multi-frame"] = (tmp_path / "multi.dcm", "2 frames")
    ct_modality = crop_dicom(chest_dicom, 64)
    ct_modality.Modality = "CT"
    ct_modality.save_as(tmp_path / "ct_modality.dcm")
    cases["CT modality"] = (tmp_path / "ct_modality.dcm", "modality CT")
    cases["CT"] = (Path(pydicom.data.get_testdata_file("CT_small.dcm")), "CT Image Storage")
    cases["MR"] = (Path(pydicom.data.get_testdata_file("MR_small.dcm")), "MR Image Storage")
    cases["SR"] = (Path(pydicom.data.get_testdata_file("test-SR.dcm")), "SR")
    cases["enhanced MR, multi-frame"] = (
        Path(pydicom.data.get_testdata_file("emri_small.dcm")),
        "not a projection",
    )
    np.save(tmp_path / "bad_shape.npy", np.zeros((2, 64, 64), np.uint8))
    cases["npy shape"] = (tmp_path / "bad_shape.npy", "shape")
    cases["missing"] = (tmp_path / "nowhere.png", "not found")
    for case, (path, reason) in cases.items():
        with pytest.raises(ImageLoadError) as caught:
            LoadChestXrayd("image")({"image": str(path)})
        message = str(caught.value)
        assert str(path) in message, (case, message)
        assert reason.lower() in message.lower(), (case, message)
        assert isinstance(caught.value, ValueError)


def test_min_size_is_a_constructor_argument(tmp_path, grey_crop):
    Image.fromarray(grey_crop[:100, :120]).save(tmp_path / "small.png")
    assert LoadChestXrayd("image", min_size=64)({"image": str(tmp_path / "small.png")})["image"].shape == (
        1,
        100,
        120,
    )
    with pytest.raises(ImageLoadError, match="minimum of 128 px"):
        LoadChestXrayd("image", min_size=128)({"image": str(tmp_path / "small.png")})


def test_original_size_from_datalist_checked_for_files_kept_for_cache(tmp_path, grey_crop):
    Image.fromarray(grey_crop).save(tmp_path / "x.png")
    with pytest.raises(ImageLoadError, match="datalist"):
        LoadChestXrayd("image")({"image": str(tmp_path / "x.png"), "original_size": [1024, 1024]})
    np.save(tmp_path / "x.npy", grey_crop[:64, :64])
    data = LoadChestXrayd("image")({"image": str(tmp_path / "x.npy"), "original_size": [1024, 1024]})
    assert data["image"].shape == (1, 64, 64) and data["original_size"] == [1024, 1024]
    np.testing.assert_allclose(data["image"][0].numpy(), grey_crop[:64, :64] / 255.0, atol=1e-7)
    with pytest.raises(ValueError, match="one key"):
        LoadChestXrayd(["image", "other"])


# ---------------------------------------------------------------- MONAI chains as the config declares them

PREPROCESS_YAML = """
image_size: 64
preprocessing:
- _target_: custom.transforms.LoadChestXrayd
  keys: image
- _target_: Resized
  keys: image
  spatial_size: ['@image_size', '@image_size']
  mode: area
- _target_: RepeatChanneld
  keys: image
  repeats: 3
- _target_: NormalizeIntensityd
  keys: image
  subtrahend: [0.485, 0.456, 0.406]
  divisor: [0.229, 0.224, 0.225]
  channel_wise: true
"""

AUGMENT_YAML = """
image_size: 64
augmentation:
- _target_: RandZoomd
  keys: image
  prob: 0.75
  min_zoom: 1.0
  max_zoom: 1.1
  mode: bilinear
  padding_mode: reflect
  keep_size: true
- _target_: RandAffined
  keys: image
  prob: 0.75
  rotate_range: '$np.deg2rad(10)'
  translate_range: ['$50 * @image_size / 512', '$50 * @image_size / 512']
  mode: bilinear
  padding_mode: reflection
- _target_: RandFlipd
  keys: image
  prob: 0.5
  spatial_axis: 1
"""


def test_preprocessing_yaml_resizes_and_normalises_per_channel(tmp_path):
    (tmp_path / "pre.yaml").write_text(PREPROCESS_YAML)
    parser = ConfigParser()
    parser.read_config(tmp_path / "pre.yaml")
    chain = Compose(parser.get_parsed_content("preprocessing"))
    data = chain({"image": str(SAMPLE / RGBA_SAMPLES[0])})
    image = data["image"]
    assert image.shape == (3, 64, 64) and data["original_size"] == [1024, 1024]
    grey = read_grey_image(SAMPLE / RGBA_SAMPLES[0]).array
    block = grey.reshape(64, 16, 64, 16).mean(axis=(1, 3))  # area resize by 16 = the 16x16 block mean
    for channel in range(3):
        expected = (block - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        np.testing.assert_allclose(image[channel].numpy(), expected, atol=1e-4)  # float32 sums


def test_augmentation_yaml_runs_and_flip_is_horizontal(tmp_path):
    (tmp_path / "aug.yaml").write_text(AUGMENT_YAML)
    parser = ConfigParser()
    parser.read_config(tmp_path / "aug.yaml")
    augment = Compose(parser.get_parsed_content("augmentation"))
    augment.set_random_state(seed=0)
    loaded = Compose([LoadChestXrayd("image"), Resized("image", (64, 64), mode="area")])(
        {"image": str(SAMPLE / GREY_SAMPLES[1])}
    )
    outputs = [augment(dict(loaded))["image"] for _ in range(6)]
    for out in outputs:
        assert out.shape == (1, 64, 64) and torch.isfinite(out).all()
    assert any(not torch.allclose(out, loaded["image"]) for out in outputs)
    flipped = RandFlipd("image", prob=1.0, spatial_axis=1)(dict(loaded))["image"]
    assert torch.equal(flipped[0], torch.flip(loaded["image"][0], dims=[1]))  # columns (x) reversed


# ---------------------------------------------------------------- box mapping


def test_boxes_round_trip_exactly():
    generator = np.random.default_rng(0)
    corners = generator.uniform(0, 1000, size=(50, 2, 2))
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
    for original, model in (
        ((1024, 1024), (512, 512)),
        ((1955, 1841), (512, 512)),
        ((2500, 2048), (320, 448)),
    ):
        there = boxes_to_model(boxes, original, model)
        np.testing.assert_allclose(boxes_to_original(there, model, original), boxes, rtol=0, atol=1e-5)
        tensor = torch.as_tensor(boxes, dtype=torch.float64)
        back = boxes_to_original(boxes_to_model(tensor, original, model), model, original)
        assert back.dtype == torch.float64 and torch.allclose(back, tensor, rtol=0, atol=1e-5)
        single = boxes_to_original(boxes_to_model(tensor.float(), original, model), model, original)
        assert single.dtype == torch.float32 and torch.allclose(single.double(), tensor, rtol=1e-6, atol=0)


def test_boxes_scale_each_axis_by_its_ratio():
    box = [[100.0, 200.0, 300.0, 400.0]]
    np.testing.assert_allclose(boxes_to_model(box, [1024, 1024], [512, 512]), [[50, 100, 150, 200]])
    np.testing.assert_allclose(
        boxes_to_model(box, [1955, 1841], [512, 512]),
        [[100 * 512 / 1841, 200 * 512 / 1955, 300 * 512 / 1841, 400 * 512 / 1955]],
    )
    assert boxes_to_model(np.zeros((0, 4)), [10, 10], [5, 5]).shape == (0, 4)
    with pytest.raises(ValueError, match="shape"):
        boxes_to_model([[1.0, 2.0, 3.0]], [10, 10], [5, 5])
    with pytest.raises(ValueError, match="H, W"):
        boxes_to_model(box, [0, 10], [5, 5])


def test_box_mapping_matches_the_resized_image():
    """A rectangle drawn in original pixels lands exactly where the mapped box says after Resized(area)."""
    original = torch.zeros(1, 80, 100)
    original[0, 10:50, 20:60] = 1.0  # rows y 10..50, columns x 20..60: box xyxy [20, 10, 60, 50]
    model_size = (40, 25)  # y / 2, x / 4
    resized = Resized("image", model_size, mode="area")({"image": original})["image"][0]
    rows = torch.nonzero(resized.sum(dim=1) > 0).flatten()
    columns = torch.nonzero(resized.sum(dim=0) > 0).flatten()
    measured = [int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1]
    mapped = boxes_to_model(np.array([[20.0, 10.0, 60.0, 50.0]]), (80, 100), model_size)
    np.testing.assert_allclose(mapped[0], measured)


def test_clip_boxes():
    boxes = torch.tensor([[-5.0, 10.0, 120.0, 90.0], [200.0, 200.0, 300.0, 300.0]])
    clipped = clip_boxes(boxes, (80, 100))
    assert clipped.tolist() == [[0.0, 10.0, 100.0, 80.0], [100.0, 80.0, 100.0, 80.0]]
    assert boxes[0, 0] == -5.0  # input untouched
    np.testing.assert_allclose(clip_boxes(np.array([[-1.0, -1.0, 5.0, 5.0]]), (4, 3)), [[0, 0, 3, 4]])
