"""Normal chest anatomy of the synthetic ChestX-ray14 phantom: its parameters and their rendering.

Coordinates here are NORMALISED image coordinates: ``u`` across (0 = left edge of the image, 1 = right edge;
the image's left is the patient's right, as on a PA radiograph), ``v`` down (0 = top edge). Pixel (row i,
column j) of an S-pixel image has its centre at ``u = (j + 0.5) / S``, ``v = (i + 0.5) / S``. Functions take
``u`` as a row [1, W] and ``v`` as a column [H, 1] and broadcast to [H, W], so they render any window.

Densities are unitless, attenuation-like and additive (0 = air outside the body, ~0.15 aerated lung, ~0.4 soft
tissue, ~0.6 mediastinum and heart, + ~0.1 where a rib crosses); ``custom.data.phantom`` maps them to grey
levels last. Only numpy is used, vectorised over pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

# Sides of the body, as the sign of (u - midline): the image-left lung is the patient's right lung.
RIGHT_LUNG, LEFT_LUNG = -1, 1


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, overflow-free (via tanh); keeps the dtype of ``x``."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def pixel_grid(
    size: int, rows: slice = slice(None), cols: slice = slice(None)
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates of a window of an S-pixel square image.

    Args:
        size: S, the image side in pixels.
        rows, cols: the window (default: the whole image).

    Returns:
        ``(u, v)``: float32 arrays [1, W] and [H, 1] (see the module docstring).
    """
    centres = (np.arange(size, dtype=np.float32) + np.float32(0.5)) / np.float32(size)
    return centres[cols][None, :], centres[rows][:, None]


@dataclass(frozen=True)
class Anatomy:
    """Geometry and densities of one normal chest, all lengths in normalised image units.

    Attributes:
        mid: u of the midline (spine).
        apex: v of the lung apices.
        base_right, base_left: v of the costophrenic angles of the image-left lung (patient's right) and the
            image-right lung; the left hemidiaphragm usually lies lower.
        dome: height of each hemidiaphragm's dome above its costophrenic angle.
        lateral: distance from the midline to the lateral lung edges.
        medial: distance from the midline to the medial lung edges at the apex (the mediastinum half-width).
        body_margin: soft tissue between the lateral lung edge and the skin.
        heart: xyxy box the heart silhouette is inscribed in (for Cardiomegaly, the finding's box).
        hilum_y: v of the hila, where the lung vessels start.
        lung_density, soft_density, mediastinum_density: densities of aerated lung, soft tissue, mediastinum.
        marking_gain: density of the lung vessel markings at their strongest.
        rib_start, rib_spacing, rib_width, rib_density: v of the first posterior rib at the spine, the spacing
            and half-width of the ribs, their density.
        bubble: gastric air bubble under the left hemidiaphragm, (u, v, radius_u, radius_v); radius 0: none.
        texture_seed: seed of the vessel-marking texture of this image.
    """

    mid: float
    apex: float
    base_right: float
    base_left: float
    dome: float
    lateral: float
    medial: float
    body_margin: float
    heart: tuple[float, float, float, float]
    hilum_y: float
    lung_density: float
    soft_density: float
    mediastinum_density: float
    marking_gain: float
    rib_start: float
    rib_spacing: float
    rib_width: float
    rib_density: float
    bubble: tuple[float, float, float, float]
    texture_seed: int

    def base(self, side: int) -> float:
        """v of the costophrenic angle of one lung (``RIGHT_LUNG`` or ``LEFT_LUNG``)."""
        return self.base_right if side == RIGHT_LUNG else self.base_left


def sample_patient_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw the anatomy of one patient (shared by the patient's follow-ups, each then jittered).

    Args:
        rng: random generator (consumed).

    Returns:
        An ``Anatomy`` with a normal heart; size, position and densities vary between patients.
    """
    scale = rng.uniform(0.9, 1.04)
    mid = 0.5 + rng.normal(0.0, 0.012)
    apex = 0.11 + rng.normal(0.0, 0.012)
    base_right = apex + scale * rng.uniform(0.6, 0.67)
    anatomy = Anatomy(
        mid=mid,
        apex=apex,
        base_right=base_right,
        base_left=base_right + rng.uniform(0.005, 0.035),
        dome=scale * rng.uniform(0.035, 0.065),
        lateral=scale * rng.uniform(0.34, 0.38),
        medial=scale * rng.uniform(0.05, 0.065),
        body_margin=rng.uniform(0.04, 0.08),
        heart=(0.0, 0.0, 0.0, 0.0),
        hilum_y=apex + scale * rng.uniform(0.27, 0.33),
        lung_density=rng.uniform(0.12, 0.17),
        soft_density=rng.uniform(0.38, 0.46),
        mediastinum_density=rng.uniform(0.58, 0.66),
        marking_gain=rng.uniform(0.08, 0.12),
        rib_start=apex + rng.uniform(0.0, 0.02),
        rib_spacing=scale * rng.uniform(0.055, 0.065),
        rib_width=scale * rng.uniform(0.011, 0.014),
        rib_density=rng.uniform(0.05, 0.075),
        bubble=(0.0, 0.0, 0.0, 0.0),
        texture_seed=0,
    )
    return replace(anatomy, heart=normal_heart_box(anatomy, rng))


def normal_heart_box(anatomy: Anatomy, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Draw a normal heart for ``anatomy`` (cardiothoracic ratio 0.38-0.46).

    Returns:
        xyxy heart box, normalised, 0.26-0.34 of the image wide at the average scale; it lies mostly right of
        the midline in the image (the patient's left) and rests on the left hemidiaphragm.
    """
    half_width = anatomy.lateral * rng.uniform(0.38, 0.46)
    half_height = half_width * rng.uniform(0.72, 0.86)
    centre_u = anatomy.mid + half_width * rng.uniform(0.25, 0.45)
    bottom = anatomy.base_left + rng.uniform(-0.01, 0.025)
    return (centre_u - half_width, bottom - 2 * half_height, centre_u + half_width, bottom)


def jitter_anatomy(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """One radiograph of a patient: the patient's anatomy shifted and scaled a little, breathing varying.

    Args:
        anatomy: the patient's anatomy.
        rng: random generator (consumed).

    Returns:
        The image's ``Anatomy`` with a fresh texture seed and, with probability 0.6, a gastric bubble.
    """
    scale = rng.uniform(0.97, 1.03)
    shift_u, shift_v = rng.normal(0.0, 0.012, size=2)
    breath = rng.normal(0.0, 0.012)

    def move_u(u: float) -> float:
        return 0.5 + (u - 0.5) * scale + shift_u

    def move_v(v: float) -> float:
        return 0.45 + (v - 0.45) * scale + shift_v

    x0, y0, x1, y1 = anatomy.heart
    moved = replace(
        anatomy,
        mid=move_u(anatomy.mid),
        apex=move_v(anatomy.apex),
        base_right=move_v(anatomy.base_right) + breath,
        base_left=move_v(anatomy.base_left) + breath,
        dome=anatomy.dome * scale,
        lateral=anatomy.lateral * scale,
        medial=anatomy.medial * scale,
        heart=(move_u(x0), move_v(y0) + breath, move_u(x1), move_v(y1) + breath),
        hilum_y=move_v(anatomy.hilum_y),
        rib_start=move_v(anatomy.rib_start),
        rib_spacing=anatomy.rib_spacing * scale,
        texture_seed=int(rng.integers(2**31)),
    )
    if rng.random() < 0.6:
        radius = rng.uniform(0.025, 0.045)
        centre_u = moved.mid + moved.lateral * rng.uniform(0.35, 0.65)
        bubble = (
            centre_u,
            moved.base_left + radius * rng.uniform(0.6, 1.2),
            radius,
            radius * rng.uniform(0.6, 0.9),
        )
        moved = replace(moved, bubble=bubble)
    return moved


def with_heart(anatomy: Anatomy, heart: tuple[float, float, float, float]) -> Anatomy:
    """``anatomy`` with its heart replaced (Cardiomegaly), the mediastinum and diaphragm following the heart.

    Args:
        heart: xyxy box of the enlarged heart, normalised.

    Returns:
        The anatomy with ``heart`` set, the midline moved part of the way to sit right of the heart's centre
        and the left hemidiaphragm at the heart's lower border, so the chest stays coherent.
    """
    x0, _, x1, y1 = heart
    mid = 0.5 * anatomy.mid + 0.5 * ((x0 + x1) / 2 - 0.07)
    base_left = y1 - 0.01
    base_right = min(anatomy.base_right, base_left - 0.005)
    return replace(anatomy, heart=heart, mid=mid, base_left=base_left, base_right=base_right)


def emphysematous(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """``anatomy`` hyperinflated (Emphysema): dark lungs with sparse markings, low flat diaphragm, long heart.

    Args:
        rng: random generator (consumed).

    Returns:
        The modified anatomy, its heart narrower and lower (``with_heart`` afterwards replaces it).
    """
    drop = rng.uniform(0.045, 0.08)
    x0, y0, x1, y1 = anatomy.heart
    centre, half = (x0 + x1) / 2, (x1 - x0) / 2 * rng.uniform(0.78, 0.9)
    return replace(
        anatomy,
        base_right=anatomy.base_right + drop,
        base_left=anatomy.base_left + drop,
        dome=anatomy.dome * rng.uniform(0.2, 0.4),
        lateral=anatomy.lateral * rng.uniform(1.0, 1.04),
        lung_density=anatomy.lung_density * rng.uniform(0.5, 0.68),
        marking_gain=anatomy.marking_gain * rng.uniform(0.3, 0.5),
        rib_spacing=anatomy.rib_spacing * rng.uniform(1.04, 1.1),
        heart=(centre - half, y0 + drop * 0.7, centre + half, y1 + drop),
    )


def lung_distance(anatomy: Anatomy, side: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance to the boundary of one lung, positive inside.

    Args:
        anatomy: the chest.
        side: ``RIGHT_LUNG`` (image left) or ``LEFT_LUNG`` (image right).
        u, v: normalised coordinates, [1, W] and [H, 1].

    Returns:
        float32 [H, W]: the smallest of the distances to the medial edge, the lateral edge (the lung rounds
        off towards the apex) and the diaphragm (a dome between the cardiophrenic and costophrenic angles).
    """
    base = anatomy.base(side)
    across = side * (u - np.float32(anatomy.mid))
    depth = (v - np.float32(anatomy.apex)) / np.float32(base - anatomy.apex)
    upper = np.clip(depth / np.float32(0.5), 0.0, 1.0)
    # A quarter ellipse from the apex to mid-height, then a slight widening towards the base.
    lateral = anatomy.lateral * np.sqrt(1.0 - (1.0 - upper) ** 2) * (0.94 + 0.06 * np.clip(depth, 0.0, 1.0))
    medial = anatomy.medial * (1.0 + 0.35 * np.clip(depth, 0.0, 1.0))
    along = np.clip((across - anatomy.medial) / (anatomy.lateral - anatomy.medial), 0.0, 1.0)
    floor = base - anatomy.dome * np.clip(np.sin(np.float32(math.pi) * along), 0.0, 1.0) ** 0.7
    return np.minimum(np.minimum(across - medial, lateral - across), floor - v).astype(np.float32)


def heart_alpha(heart: tuple[float, float, float, float], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Opacity of the heart silhouette: an ellipse inscribed in its box, tilted down towards the image right.

    The ellipse's long axis runs from the upper-left (the right heart border, near the spine) to the apex at
    the lower right (the patient's left); its minor semi-axis is 0.85 of the box's smaller half-side and the
    tilt is the one that makes its bounding box exactly ``heart`` (so opacity 0.5 touches all four box edges).

    Args:
        heart: xyxy box, normalised.
        u, v: normalised coordinates, [1, W] and [H, 1].

    Returns:
        float32 [H, W] in [0, 1].
    """
    x0, y0, x1, y1 = heart
    return inscribed_ellipse_alpha(heart, 0.85 * min(x1 - x0, y1 - y0) / 2, 1, u, v, 0.03)


def inscribed_ellipse_alpha(box, minor: float, tilt_sign: int, u: np.ndarray, v: np.ndarray, edge: float):
    """Opacity of the tilted ellipse with semi-minor axis ``minor`` whose bounding box is exactly ``box``.

    For half-sides W, H and minor axis b <= min(W, H): major axis a^2 = W^2 + H^2 - b^2 and the tilt t with
    cos 2t = (W^2 - H^2) / (a^2 - b^2) give a bounding box of half-sides W, H.

    Args:
        box: xyxy, normalised.
        minor: semi-minor axis b (clipped to min(W, H)).
        tilt_sign: +1 tilts the major axis down to the right (as v grows with u), -1 up to the right.
        u, v: normalised coordinates, [1, W] and [H, 1].
        edge: blur of the outline as a fraction of the radius (opacity 0.5 on the outline).

    Returns:
        float32 [H, W] in [0, 1].
    """
    x0, y0, x1, y1 = box
    half_w, half_h = (x1 - x0) / 2, (y1 - y0) / 2
    minor = min(minor, half_w, half_h)
    major_sq = half_w**2 + half_h**2 - minor**2
    spread = major_sq - minor**2
    tilt = 0.0 if spread <= 1e-12 else 0.5 * math.acos(max(-1.0, min(1.0, (half_w**2 - half_h**2) / spread)))
    tilt *= tilt_sign
    du, dv = u - np.float32((x0 + x1) / 2), v - np.float32((y0 + y1) / 2)
    along = du * np.float32(math.cos(tilt)) + dv * np.float32(math.sin(tilt))
    normal = -du * np.float32(math.sin(tilt)) + dv * np.float32(math.cos(tilt))
    radius = np.sqrt(along**2 / np.float32(major_sq) + normal**2 / np.float32(minor**2))
    return sigmoid((1.0 - radius) / np.float32(edge)).astype(np.float32)


def ellipse_alpha(centre_u: float, centre_v: float, radius_u: float, radius_v: float, u, v, edge: float):
    """Opacity of an ellipse, 0.5 on its outline; ``edge`` is the blur as a fraction of the radii. [H, W]."""
    radius = np.sqrt(
        ((u - np.float32(centre_u)) / np.float32(radius_u)) ** 2
        + ((v - np.float32(centre_v)) / np.float32(radius_v)) ** 2
    )
    return sigmoid((1.0 - radius) / np.float32(edge))


class ValueNoise:
    """A smooth random field (value noise) over a box, resolution independent.

    A grid of standard-normal values, ``cells_u x cells_v`` cells across ``box`` (plus a margin), interpolated
    with smoothstep weights; evaluating it on a window of any image size gives the same field.

    Args:
        rng: random generator (consumed at construction).
        box: xyxy region, normalised, that the cells span.
        cells_u, cells_v: cells across and down the box (the feature size is box size / cells).
    """

    def __init__(
        self, rng: np.random.Generator, box: tuple[float, float, float, float], cells_u: int, cells_v: int
    ):
        self.box = tuple(float(value) for value in box)
        self.cells = (max(1, int(cells_u)), max(1, int(cells_v)))
        self.grid = rng.standard_normal((self.cells[1] + 3, self.cells[0] + 3)).astype(np.float32)

    def __call__(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Field values at ``u`` [1, W], ``v`` [H, 1]: float32 [H, W], about zero mean and 0.7 s.d."""
        x0, y0, x1, y1 = self.box
        col, col_w = _smooth_index((u[0] - x0) / (x1 - x0) * self.cells[0] + 1.0, self.grid.shape[1])
        row, row_w = _smooth_index((v[:, 0] - y0) / (y1 - y0) * self.cells[1] + 1.0, self.grid.shape[0])
        across = self.grid[:, col] * (1.0 - col_w) + self.grid[:, col + 1] * col_w
        return (across[row] * (1.0 - row_w)[:, None] + across[row + 1] * row_w[:, None]).astype(np.float32)


def _smooth_index(position: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower grid index and smoothstep weight of fractional grid positions, clamped to the grid."""
    position = np.clip(position, 0.0, length - 1.001)
    index = np.floor(position).astype(np.int64)
    fraction = (position - index).astype(np.float32)
    return index, fraction * fraction * (3.0 - 2.0 * fraction)


@dataclass
class AnatomyLayers:
    """The rendered normal chest, float32 [S, S] each.

    Attributes:
        tissue: soft tissue, lungs, mediastinum, heart, abdomen (density).
        markings: lung vessel markings, 0-1, already confined to the lungs (scaled by ``marking_gain`` later,
            after lesions have masked them).
        bone: spine, ribs and clavicles (density, added on top of everything).
        lungs: opacity of the two lung fields, 0-1.
    """

    tissue: np.ndarray
    markings: np.ndarray
    bone: np.ndarray
    lungs: np.ndarray


def render_anatomy(anatomy: Anatomy, size: int) -> AnatomyLayers:
    """Render ``anatomy`` on an S x S grid.

    Args:
        anatomy: the chest.
        size: S, the image side in pixels.

    Returns:
        ``AnatomyLayers`` (see there).
    """
    a = anatomy
    u, v = pixel_grid(size)
    across = np.abs(u - np.float32(a.mid))
    edge = np.float32(max(0.004, 1.0 / size))

    # Body: a cylinder of soft tissue, thinner (darker) towards the skin, shoulders widening at the top.
    half_body = a.lateral + a.body_margin + 0.05 * sigmoid((a.apex + 0.06 - v) / np.float32(0.03))
    body = sigmoid((half_body - across) / np.float32(0.008))
    thickness = np.sqrt(np.clip(1.0 - (across / half_body) ** 2, 0.0, 1.0))
    tissue = a.soft_density * body * (0.55 + 0.45 * thickness)
    # Abdomen below the diaphragm is denser than the chest wall.
    mean_base = (a.base_right + a.base_left) / 2
    tissue = tissue + 0.08 * body * sigmoid((v - np.float32(mean_base - a.dome)) / np.float32(0.04))

    lungs = np.zeros((size, size), dtype=np.float32)
    markings = np.zeros((size, size), dtype=np.float32)
    texture = np.random.default_rng(a.texture_seed)
    split = min(size, max(0, round(a.mid * size)))
    for side, cols in ((RIGHT_LUNG, slice(0, split)), (LEFT_LUNG, slice(split, size))):
        # Each lung is rendered on its own half of the image (it does not cross the midline): half the work.
        side_u, side_across = u[:, cols], across[:, cols]
        lung = sigmoid(lung_distance(a, side, side_u, v) / edge)
        depth = np.clip((v - np.float32(a.apex)) / np.float32(a.base(side) - a.apex), 0.0, 1.0)
        # Breast and chest-wall soft tissue overlap the lower lung, so the bases are denser than the apices.
        lung_level = a.lung_density * (1.0 + 0.6 * depth**2 + 0.25 * (side_across / a.lateral - 0.6) ** 2)
        tissue[:, cols] = tissue[:, cols] * (1.0 - lung) + lung_level * lung
        lungs[:, cols] = lung
        markings[:, cols] = lung * _vessel_markings(a, side, side_u, v, texture)

    # Mediastinum (widening downwards), aortic knob, heart, trachea, gastric bubble.
    depth = np.clip((v - np.float32(a.apex)) / np.float32(mean_base - a.apex), 0.0, 1.0)
    mediastinum = sigmoid((a.medial * (0.95 + 0.35 * depth) - across) / np.float32(0.006)) * body
    # Between the lungs only: above them is the neck, below them the abdomen.
    mediastinum = mediastinum * sigmoid((v - np.float32(a.apex - 0.05)) / np.float32(0.02))
    mediastinum = mediastinum * sigmoid((np.float32(a.heart[3] - 0.04) - v) / np.float32(0.02))
    tissue = tissue + (a.mediastinum_density - tissue) * mediastinum
    knob = ellipse_alpha(a.mid + a.medial * 0.9, a.apex + 0.17, 0.028, 0.026, u, v, 0.1)
    tissue = tissue + (a.mediastinum_density - tissue) * knob
    heart = heart_alpha(a.heart, u, v)
    tissue = tissue + (0.95 * a.mediastinum_density - tissue) * heart
    trachea = sigmoid((0.011 - across) / np.float32(0.003)) * sigmoid(
        (a.hilum_y - 0.07 - v) / np.float32(0.01)
    )
    tissue = tissue - 0.12 * trachea
    if a.bubble[2] > 0:
        tissue = tissue - 0.2 * ellipse_alpha(*a.bubble, u, v, 0.12) * body

    bone = _bones(a, u, v, across)
    return AnatomyLayers(tissue=tissue.astype(np.float32), markings=markings, bone=bone, lungs=lungs)


def _vessel_markings(a: Anatomy, side: int, u, v, rng: np.random.Generator) -> np.ndarray:
    """Vessel markings fanning out from one hilum, curving, branching, tapering outwards. [H, W] in 0-1."""
    hilum_u = a.mid + side * (a.medial + 0.045)
    du, dv = side * (u - np.float32(hilum_u)), v - np.float32(a.hilum_y)
    radius = np.sqrt(du**2 + dv**2)
    # Smooth noise bends the vessels (angle) and breaks them into segments, so no two chests share a pattern.
    bend = ValueNoise(rng, (0.0, 0.0, 1.0, 1.0), 5, 5)(u, v)
    angle = np.arctan2(dv, du) + 0.12 * bend
    count = rng.uniform(14.0, 20.0)
    main = np.clip(np.cos(count * angle + rng.uniform(0, 2 * math.pi)), 0.0, None) ** 10
    branches = np.clip(np.cos(2.3 * count * angle - 1.5 * bend + 12.0 * radius), 0.0, None) ** 12
    breaks = sigmoid(2.5 * ValueNoise(rng, (0.0, 0.0, 1.0, 1.0), 14, 14)(u, v) + 1.0)
    taper = np.exp(-radius / np.float32(0.16))
    hilum = np.exp(-((radius / np.float32(0.04)) ** 2))
    outer = sigmoid((radius - 0.07) / np.float32(0.02))
    return ((main + 0.6 * branches * outer) * taper * breaks + 1.3 * hilum).astype(np.float32)


def _bones(a: Anatomy, u, v, across) -> np.ndarray:
    """Spine, posterior and anterior ribs and clavicles. [H, W] density."""
    spine = sigmoid((0.03 - across) / np.float32(0.005))
    vertebrae = 0.88 + 0.12 * np.cos(np.float32(2 * math.pi / 0.042) * v)
    bone = 0.05 * spine * vertebrae

    mean_base = (a.base_right + a.base_left) / 2
    thorax = (
        sigmoid((a.lateral + 0.025 - across) / np.float32(0.01))
        * sigmoid((across - 0.02) / np.float32(0.008))
        * sigmoid((mean_base + 0.02 - v) / np.float32(0.02))
        * sigmoid((v - (a.apex - 0.04)) / np.float32(0.02))
    )
    # Posterior ribs: parallel arcs, rising a little from the spine, then curving down laterally. The distance
    # to the nearest rib is the distance to the nearest integer "rib phase", so all ribs cost one pass.
    posterior = (v - np.float32(a.rib_start) - (-0.25 * across + 1.5 * across**2)) / np.float32(a.rib_spacing)
    nearest = np.clip(np.round(posterior), 0, 9)
    ribs = np.exp(-(((posterior - nearest) * a.rib_spacing / a.rib_width) ** 2))
    # Anterior ribs: fainter, sloping down towards the midline.
    anterior = (v - np.float32(a.rib_start + 0.12) + 0.45 * across) / np.float32(a.rib_spacing * 1.1)
    nearest = np.clip(np.round(anterior), 0, 5)
    ribs_front = np.exp(-(((anterior - nearest) * a.rib_spacing / (a.rib_width * 1.3)) ** 2))
    bone = bone + thorax * (
        a.rib_density * ribs + 0.35 * a.rib_density * ribs_front * sigmoid((across - 0.06) / np.float32(0.01))
    )

    clavicle_v = a.apex + 0.03 - 0.15 * (across - 0.04)
    clavicle = np.exp(-(((v - clavicle_v) / np.float32(0.011)) ** 2)) * sigmoid(
        (0.32 - across) / np.float32(0.01)
    )
    bone = bone + 0.12 * clavicle * sigmoid((across - 0.035) / np.float32(0.008))
    return bone.astype(np.float32)
