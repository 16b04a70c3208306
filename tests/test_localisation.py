"""Tests of custom.localisation: the grid convention, the Sal/Det/Mix maps, the box rule and the IoU."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from custom.localisation.box_rule import (
    BoxRule,
    binarise,
    box_scores,
    grid_boxes,
    map_quantiles,
    mask_boxes,
    select_component,
    threshold_values,
)
from custom.localisation.grid import box_grid_ranges, box_masks, grid_boxes_to_image
from custom.localisation.maps import detection_map, minmax_scale, mix_map, rpsal_maps, saliency_map


def extract_boxes(maps, thresholds, original_sizes, mode="percentile", component="largest", connectivity=8):
    """The box rule's single-threshold entry point, as (boxes in original pixels, valid)."""
    found = BoxRule(mode, component, connectivity).boxes(maps, thresholds, original_sizes)
    return found.boxes, found.valid


def naive_detection_map(logits, boxes, input_size, grid_size, weighting, normalize, sharpness=1.0):
    """One proposal at a time: weight every map pixel whose centre lies in [x0, x1) x [y0, y1)."""
    (input_h, input_w), (grid_h, grid_w) = input_size, grid_size
    centre_y = (np.arange(grid_h) + 0.5) * input_h / grid_h
    centre_x = (np.arange(grid_w) + 0.5) * input_w / grid_w
    logits, boxes = logits.double().numpy(), boxes.double().numpy()
    if weighting == "softmax":
        weights = np.exp(sharpness * logits)
        normalize = True  # softmax: exp(r c) over its sum
    else:
        weights = 1 / (1 + np.exp(-logits)) if weighting == "sigmoid" else logits
    batch, classes, proposals = logits.shape
    out = np.zeros((batch, classes, grid_h, grid_w))
    for b in range(batch):
        for k in range(classes):
            for n in range(proposals):
                x0, y0, x1, y1 = boxes[b, k, n]
                inside_y = (centre_y >= y0) & (centre_y < y1)
                inside_x = (centre_x >= x0) & (centre_x < x1)
                out[b, k] += weights[b, k, n] * (inside_y[:, None] & inside_x[None, :])
            if normalize:
                out[b, k] /= weights[b, k].sum()
    return out


def random_boxes(generator, shape, input_size):
    """Random xyxy boxes (shape + (4,)) in an (H, W) input, some reaching past the border (then clipped) and
    some degenerate (x0 == x1)."""
    height, width = input_size
    corner = torch.rand(*shape, 2, generator=generator) * torch.tensor([width, height]) * 1.1 - 5
    size = torch.rand(*shape, 2, generator=generator) * torch.tensor([width, height]) * 0.6
    boxes = torch.cat([corner, corner + size], dim=-1)
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, width)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, height)
    boxes[..., 0, 2] = boxes[..., 0, 0]  # a degenerate box per class
    return boxes


# ---- grid convention ---------------------------------------------------------------------------------------

def test_box_grid_ranges_follow_the_pixel_centre_rule():
    # 16 px input, 4 map pixels: centres at 2, 6, 10, 14; a box covers a centre c when x0 <= c < x1.
    boxes = torch.tensor([[2.0, 0.0, 10.0, 16.0], [2.01, 6.0, 10.01, 6.5], [-3.0, 6.1, 99.0, 14.0]])
    r0, r1, c0, c1 = box_grid_ranges(boxes, (16, 16), 4)
    assert (c0.tolist(), c1.tolist()) == ([0, 1, 0], [2, 3, 4])
    assert (r0.tolist(), r1.tolist()) == ([0, 1, 2], [4, 2, 3])  # [6.1, 14) holds only the centre 10
    r0, r1, _, _ = box_grid_ranges(torch.tensor([0.0, 6.1, 16.0, 9.9]), (16, 16), 4)
    assert r0 == r1  # no row centre in [6.1, 9.9): empty


def test_box_masks_paint_thin_boxes_on_one_pixel_only_when_asked():
    thin = torch.tensor([6.5, 2.5, 7.5, 10.5])  # 16 px, 4 cells: no column centre in [6.5, 7.5)
    assert box_masks(thin, (16, 16), 4, min_one_pixel=False).sum() == 0
    mask = box_masks(thin, (16, 16), 4)
    # Column 1 holds x = 7; rows 1 and 2 have their centres 6 and 10 inside.
    assert mask.sum() == 2 and mask[1:3, 1].tolist() == [1, 1]
    assert box_masks(torch.tensor([20.0, 0, 30, 16]), (16, 16), 4).sum() == 0  # outside the image


# ---- maps --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighting, normalize, sharpness",
                         [("sigmoid", True, 1.0), ("sigmoid", False, 1.0), ("raw", False, 1.0),
                          ("softmax", True, 5.0), ("softmax", False, 0.5)])
def test_detection_map_equals_a_loop_over_proposals(weighting, normalize, sharpness):
    generator = torch.Generator().manual_seed(0)
    input_size, grid_size = (40, 56), (10, 14)  # non-square, 4 input px per map px
    logits = 3 * torch.randn(2, 3, 25, generator=generator)
    boxes = random_boxes(generator, (2, 3, 25), input_size)
    det = detection_map(logits, boxes, input_size, grid_size, weighting, normalize, sharpness)
    reference = naive_detection_map(logits, boxes, input_size, grid_size, weighting, normalize, sharpness)
    assert det.shape == (2, 3, 10, 14) and det.dtype == torch.float32
    # Float64 accumulation: the only difference is the float32 rounding of the output.
    np.testing.assert_allclose(det.numpy(), reference, rtol=1e-6, atol=1e-5)


def test_detection_map_matches_the_loop_at_a_non_integer_scale():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 2, 30, generator=generator)
    boxes = random_boxes(generator, (1, 2, 30), (50, 50))
    det = detection_map(logits, boxes, 50, 12, "sigmoid", True)  # 50 / 12 px per map px
    np.testing.assert_allclose(det.numpy(), naive_detection_map(logits, boxes, (50, 50), (12, 12), "sigmoid",
                                                                True), rtol=1e-6, atol=1e-6)


def test_detection_map_of_one_proposal_is_its_box_mask():
    box = torch.tensor([[[[12.0, 4.0, 36.0, 28.0]]]])  # (B, K, N, 4) in a 64 px input, 16 x 16 map
    det = detection_map(torch.tensor([[[0.3]]]), box, 64, 16)
    expected = box_masks(box[0, 0, 0], (64, 64), 16, min_one_pixel=False)
    assert torch.equal(det[0, 0], expected)
    assert expected.sum() == 6 * 6 and expected[1:7, 3:9].all()
    raw = detection_map(torch.tensor([[[-2.5]]]), box, 64, 16, weighting="raw", normalize=False)
    assert torch.equal(raw[0, 0], -2.5 * expected)


def test_detection_map_rejects_normalised_raw_weights_and_bad_shapes():
    logits, boxes = torch.zeros(1, 1, 2), torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="normalize"):
        detection_map(logits, boxes, 64, 16, weighting="raw", normalize=True)
    with pytest.raises(ValueError, match="refined_boxes"):
        detection_map(logits, boxes[..., :3], 64, 16)
    with pytest.raises(ValueError, match="weighting"):
        detection_map(logits, boxes, 64, 16, weighting="softmin")
    for sharpness in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sharpness"):
            detection_map(logits, boxes, 64, 16, weighting="softmax", sharpness=sharpness)


def test_softmax_det_follows_the_strongest_proposal_where_sigmoid_washes_it_out():
    """Many weak proposals over the whole image and one strong one: the sigmoid-weighted average keeps the whole
    image near its maximum (the weak ones still weigh sigmoid(-2) each), the softmax weighting does not."""
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0]]).repeat(50, 1)
    boxes[0] = torch.tensor([8.0, 8.0, 24.0, 24.0])
    logits = torch.full((1, 1, 50), -2.0)
    logits[0, 0, 0] = 4.0
    sigmoid = detection_map(logits, boxes[None, None], 64, 16, "sigmoid", True)[0, 0]
    softmax = detection_map(logits, boxes[None, None], 64, 16, "softmax", True, sharpness=5.0)[0, 0]
    inside, outside = (4, 4), (12, 12)
    assert sigmoid[outside] / sigmoid[inside] > 0.85
    assert softmax[outside] / softmax[inside] < 0.01


def test_minmax_scale_and_mix():
    maps = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]], [[3.0, 3.0], [3.0, 3.0]]]])
    scaled = minmax_scale(maps)
    assert torch.allclose(scaled[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(scaled[0, 1], torch.zeros(2, 2))  # a constant map carries no localisation
    sal = torch.full_like(maps, 0.5)
    assert torch.allclose(mix_map(sal, maps, scale_det=True), 0.5 * scaled)
    assert torch.allclose(mix_map(sal, maps, scale_det=False), 0.5 * maps)


def test_rpsal_maps_from_network_outputs():
    generator = torch.Generator().manual_seed(2)
    saliency = torch.randn(2, 3, 8, 8, generator=generator)
    logits = torch.randn(2, 3, 6, generator=generator)
    boxes = random_boxes(generator, (2, 3, 6), (32, 32))
    maps = rpsal_maps(saliency, logits, boxes, 32)
    assert set(maps) == {"sal", "det", "mix"} and all(m.shape == (2, 3, 8, 8) for m in maps.values())
    assert torch.allclose(maps["sal"], torch.sigmoid(saliency))
    assert torch.allclose(maps["mix"], maps["sal"] * maps["det"])
    assert 0 <= maps["det"].min() and maps["det"].max() <= 1
    raw = rpsal_maps(saliency, logits, boxes, 32, weighting="raw", normalize=False)
    assert torch.allclose(raw["mix"], raw["sal"] * minmax_scale(raw["det"]))
    assert saliency_map(saliency, 16).shape == (2, 3, 16, 16)


# ---- thresholds and components -----------------------------------------------------------------------------

def two_blob_map():
    """A 10 x 12 map: a large blob at 0.6 (rows 1-4, cols 1-5) and a small one holding the maximum (rows 6-7,
    cols 8-9, peak 1.0), on a 0.1 floor."""
    values = np.full((10, 12), 0.1, dtype=np.float32)
    values[1:5, 1:6] = 0.6
    values[6:8, 8:10] = 0.8
    values[7, 9] = 1.0
    return values


@pytest.mark.parametrize("component, expected", [
    ("largest", [1, 1, 6, 5]),  # xyxy map pixels: columns 1-5, rows 1-4
    ("max", [8, 6, 10, 8]),
    ("union", [1, 1, 10, 8]),
])
def test_component_choice_on_two_blobs(component, expected):
    maps = torch.from_numpy(two_blob_map())[None, None]
    boxes, valid = extract_boxes(maps, [0.5], (10, 12), mode="absolute", component=component)
    assert valid.item() and boxes[0, 0].tolist() == expected
    # The same blobs picked by percentile: 24 of 120 pixels are above the floor, the 80th percentile.
    boxes, _ = extract_boxes(maps, [0.8], (10, 12), mode="percentile", component=component)
    assert boxes[0, 0].tolist() == expected


def test_boxes_convert_to_original_pixels_of_non_square_images():
    maps = torch.zeros(2, 1, 4, 8)
    maps[:, 0, 1:3, 2:6] = 1.0  # rows 1-2, columns 2-5 of a 4 x 8 map
    boxes, valid = extract_boxes(maps, [0.5], torch.tensor([[600, 1000], [1024, 768]]), mode="absolute")
    # Map column j spans [j W/8, (j + 1) W/8), row i spans [i H/4, (i + 1) H/4).
    assert valid.all()
    assert boxes[0, 0].tolist() == [250.0, 150.0, 750.0, 450.0]
    assert boxes[1, 0].tolist() == [192.0, 256.0, 576.0, 768.0]
    assert grid_boxes_to_image(torch.tensor([0.0, 0.0, 8.0, 4.0]), (4, 8), (600, 1000)).tolist() == \
        [0.0, 0.0, 1000.0, 600.0]


def test_percentile_thresholds_match_numpy_quantiles():
    maps = torch.rand(3, 2, 7, 9, generator=torch.Generator().manual_seed(3))
    quantiles = [0.0, 0.35, 0.9, 1.0]
    expected = np.quantile(maps.flatten(-2).double().numpy(), quantiles, axis=-1)
    np.testing.assert_allclose(map_quantiles(maps, quantiles).numpy(), expected, rtol=1e-12)
    per_class = threshold_values(maps, np.array([0.35, 0.9]), "percentile")
    np.testing.assert_allclose(per_class.numpy(), np.stack([expected[1, :, 0], expected[2, :, 1]], axis=1))
    assert torch.equal(threshold_values(maps, 0.3, "absolute"), torch.full((3, 2), 0.3, dtype=torch.float64))
    with pytest.raises(ValueError, match="percentile"):
        threshold_values(maps, 90, "percentile")


def test_binarise_is_strict_at_the_map_floor():
    det = torch.zeros(1, 1, 4, 4)
    det[0, 0, :2, :2] = torch.tensor([[0.5, 0.2], [0.2, 0.1]])  # 12 of 16 pixels on the 0 floor
    mask = binarise(det, threshold_values(det, [0.5], "percentile"))  # the median is the floor value 0
    assert mask.sum() == 4 and mask[0, 0, :2, :2].all()
    assert binarise(det, torch.tensor(0.2)).sum() == 3  # >= above the floor
    constant = torch.full((1, 1, 3, 3), 0.7)
    boxes, valid = extract_boxes(constant, [0.9], (30, 30))
    assert not valid.item() and torch.isnan(boxes).all()


def test_binarise_is_exact_against_float64_thresholds():
    maps = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float32)
    just_above = float(np.nextafter(np.float64(np.float32(0.3)), 1.0))
    assert binarise(maps, just_above).sum() == 1  # float32(0.3) < the threshold: only 0.4 passes
    assert binarise(maps, float(np.float32(0.3))).sum() == 2


def test_half_precision_maps_give_the_same_boxes():
    maps = torch.from_numpy(two_blob_map())[None, None]
    expected, _ = extract_boxes(maps, [0.8], (100, 120))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(extract_boxes(maps.to(dtype), [0.8], (100, 120))[0], expected)


def test_nan_threshold_and_empty_mask_give_no_box():
    maps = torch.rand(2, 2, 5, 5, generator=torch.Generator().manual_seed(4))
    boxes, valid = extract_boxes(maps, [float("nan"), 2.0], (50, 50), mode="absolute")
    assert not valid.any() and torch.isnan(boxes).all()
    with pytest.raises(ValueError, match="NaN"):
        extract_boxes(torch.full((1, 1, 2, 2), float("nan")), [0.5], (8, 8))


def test_connectivity_and_largest_ties():
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # diagonal neighbours
    mask[0, 3, 3] = mask[0, 3, 4] = True  # two 4-connected pixels
    eight = select_component(mask, component="largest", connectivity=8)
    assert mask_boxes(eight)[0].tolist() == [[0.0, 0.0, 2.0, 2.0]]  # tie of size 2: first in row-major
    four = select_component(mask, component="largest", connectivity=4)
    assert mask_boxes(four)[0].tolist() == [[3.0, 3.0, 5.0, 4.0]]
    with pytest.raises(ValueError, match="connectivity"):
        select_component(mask, connectivity=6)


def reference_component(mask, values, component):
    """One 2D map at a time with scipy's labels and explicit size counting."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0 or component == "union":
        return mask.copy()
    if component == "max":
        keep = labels[np.unravel_index(np.argmax(values), values.shape)]
    else:
        sizes = [(labels == label).sum() for label in range(1, count + 1)]
        keep = 1 + int(np.argmax(sizes))  # first label of the largest size: first met in row-major order
    return labels == keep


@pytest.mark.parametrize("component", ["largest", "max", "union"])
def test_stacked_labelling_matches_one_map_at_a_time(component):
    # Smooth random maps with several components each; components never join across stacked maps.
    generator = torch.Generator().manual_seed(5)
    coarse = torch.randn(6, 4, 4, 4, generator=generator)
    maps = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    masks = binarise(maps, threshold_values(maps, 0.7, "percentile"))
    kept = select_component(masks, maps, component)
    for index in np.ndindex(*maps.shape[:2]):
        expected = reference_component(masks[index].numpy(), maps[index].numpy(), component)
        assert np.array_equal(kept[index].numpy(), expected), index
    boxes, valid = grid_boxes(maps, threshold_values(maps, 0.7, "percentile"), component)
    assert valid.all() and torch.equal(boxes, mask_boxes(kept)[0])


def test_box_scores_are_the_mean_of_the_map_inside_each_box():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 5, 12, 10, generator=generator)
    corners = torch.randint(0, 10, (3, 5, 2, 2), generator=generator)
    boxes = torch.stack(
        [
            corners[..., 0].min(-1).values,
            corners[..., 1].min(-1).values,
            corners[..., 0].max(-1).values + 1,
            corners[..., 1].max(-1).values + 1,
        ],
        -1,
    ).float()
    boxes[0, 0] = torch.nan
    scores = box_scores(maps, boxes)
    for b in range(3):
        for k in range(5):
            if b == 0 and k == 0:
                assert math.isnan(scores[b, k])
                continue
            x0, y0, x1, y1 = boxes[b, k].long().tolist()
            assert scores[b, k] == pytest.approx(float(maps[b, k, y0:y1, x0:x1].mean()), rel=1e-5)
