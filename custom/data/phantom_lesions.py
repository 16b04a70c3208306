"""The 14 findings of the synthetic ChestX-ray14 phantom: their shapes, extents and appearance.

Every finding is a ``Lesion``: built from a target region (xyxy, normalised image coordinates as in
``custom.data.phantom_anatomy``), a seed and the chest's ``Anatomy``, it draws its shape from its seed alone,
so its extent is reproducible anywhere (the planner measures the box in one process, a worker paints the
pixels in another). ``alpha(u, v)`` is the lesion's opacity envelope; the written box of a box class is the
tight box of ``alpha >= 0.5``, its true extent. ``paint(canvas)`` adds the lesion's density (and, for air
collections, removes lung markings). Position, size, shape, density and texture are random within each class's
prior, so no class can be read from a single pixel or a fixed place.
"""

from __future__ import annotations

import math

import numpy as np

from custom.data.phantom_anatomy import (
    LEFT_LUNG,
    RIGHT_LUNG,
    Anatomy,
    ValueNoise,
    ellipse_alpha,
    heart_alpha,
    inscribed_ellipse_alpha,
    lung_distance,
    pixel_grid,
    sigmoid,
)

Box = tuple[float, float, float, float]


class Canvas:
    """The layers findings paint on, for one S x S image.

    Attributes:
        size: S in pixels.
        anatomy: the chest (findings that follow the lungs read it).
        lungs: float32 [S, S], opacity of the lung fields (read only).
        density: float32 [S, S], density added by findings (opacities > 0, air < 0).
        marking_mask: float32 [S, S], multiplies the lung vessel markings (0 where a finding removes them).
    """

    def __init__(self, size: int, anatomy: Anatomy, lungs: np.ndarray):
        self.size = size
        self.anatomy = anatomy
        self.lungs = lungs
        self.density = np.zeros((size, size), dtype=np.float32)
        self.marking_mask = np.ones((size, size), dtype=np.float32)

    def window(self, region: Box) -> tuple[slice, slice, np.ndarray, np.ndarray]:
        """Pixel window covering a normalised xyxy region, clipped to the image.

        Returns:
            ``(rows, cols, u, v)``: slices into the [S, S] layers and the window's normalised coordinates,
            [1, W] and [H, 1]. The window may be empty when the region lies outside the image.
        """
        return pixel_window(region, self.size)


def pixel_window(region: Box, size: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Pixels whose centres may lie in a normalised xyxy ``region`` of an S-pixel image (see Canvas)."""
    x0, y0, x1, y1 = region
    cols = slice(max(0, math.floor(x0 * size)), min(size, math.ceil(x1 * size) + 1))
    rows = slice(max(0, math.floor(y0 * size)), min(size, math.ceil(y1 * size) + 1))
    u, v = pixel_grid(size, rows, cols)
    return rows, cols, u, v


def expand(box: Box, fraction: float) -> Box:
    """``box`` grown on every side by ``fraction`` of its width / height."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * fraction, (y1 - y0) * fraction
    return (x0 - dx, y0 - dy, x1 + dx, y1 + dy)


def ellipse_radius(box: Box, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Normalised radius of the ellipse inscribed in ``box`` (1 on its outline). [H, W]."""
    x0, y0, x1, y1 = box
    du = (u - np.float32((x0 + x1) / 2)) / np.float32((x1 - x0) / 2)
    dv = (v - np.float32((y0 + y1) / 2)) / np.float32((y1 - y0) / 2)
    return np.sqrt(du**2 + dv**2)


class Lesion:
    """One finding in one image.

    Args:
        box: target region, xyxy normalised (for a box class, drawn from that class's box statistics; the
            lesion fills it, so its measured extent is this box or a little less).
        seed: seed of the lesion's shape (stream 0) and texture (stream 1).
        anatomy: the chest it lies in.
        bilateral: a box spanning both lungs (a "both sides" group of the statistics): the lesion is drawn as
            two parts, one at each end of the box, so their union spans it.

    Attributes:
        name: the class, as in ``custom.labels.CLASS_NAMES``.
        region: xyxy normalised area that ``alpha`` and ``paint`` may touch.
    """

    name = ""

    def __init__(self, box: Box, seed: int, anatomy: Anatomy, bilateral: bool = False):
        self.box = tuple(float(value) for value in box)
        self.seed = int(seed)
        self.anatomy = anatomy
        self.bilateral = bilateral
        # Soft margins fade out beyond the box; painting stops a little further out.
        self.region = expand(self.box, 0.15)
        self.shape_rng = np.random.default_rng([self.seed, 0])
        self.parts = self._parts() if bilateral else [self.box]

    def _parts(self) -> list[Box]:
        """Two sub-boxes at the two ends of a bilateral box, each 28-45% of its width."""
        x0, y0, x1, y1 = self.box
        left, right = self.shape_rng.uniform(0.28, 0.45, size=2) * (x1 - x0)
        return [(x0, y0, x0 + left, y1), (x1 - right, y0, x1, y1)]

    def lateral_sign(self, part: Box) -> int:
        """-1 when ``part`` lies left of the midline (its lateral side is its left edge), else +1."""
        return -1 if (part[0] + part[2]) / 2 < self.anatomy.mid else 1

    def alpha(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Opacity envelope on a window, float32 [H, W] in [0, 1]; the lesion's extent is ``alpha >= 0.5``."""
        raise NotImplementedError(f"{type(self).__name__} is diffuse: it has no extent")

    def extent(self, size: int) -> tuple[float, float, float, float] | None:
        """The lesion's true box in an S-pixel image: the tight box of the pixels with ``alpha >= 0.5``.

        Returns:
            xyxy in the image's pixels (continuous coordinates: a pixel's left edge is its column index, so
            x1 = last column + 1), or None when no pixel centre reaches 0.5.
        """
        rows, cols, u, v = pixel_window(self.region, size)
        if u.size == 0 or v.size == 0:
            return None
        inside = self.alpha(u, v) >= 0.5
        hit_rows, hit_cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if hit_rows.size == 0:
            return None
        return (
            float(cols.start + hit_cols[0]),
            float(rows.start + hit_rows[0]),
            float(cols.start + hit_cols[-1] + 1),
            float(rows.start + hit_rows[-1] + 1),
        )

    def paint(self, canvas: Canvas) -> None:
        """Add the lesion to ``canvas`` (density and, for air, the marking mask)."""
        rows, cols, u, v = canvas.window(self.region)
        if u.size == 0 or v.size == 0:
            return
        texture = np.random.default_rng([self.seed, 1])
        canvas.density[rows, cols] += self.density(u, v, texture, canvas, rows, cols)

    def density(
        self, u, v, texture: np.random.Generator, canvas: Canvas, rows: slice, cols: slice
    ) -> np.ndarray:
        """Density added on the window ``(rows, cols)``, float32 [H, W]."""
        raise NotImplementedError


class Nodule(Lesion):
    """A small round, well-defined opacity, sometimes with a calcified (denser) core."""

    name = "Nodule"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.amplitude = self.shape_rng.uniform(0.18, 0.3)
        self.calcified = self.shape_rng.random() < 0.15

    def alpha(self, u, v):
        return sigmoid((1.0 - ellipse_radius(self.box, u, v)) / np.float32(0.06))

    def density(self, u, v, texture, canvas, rows, cols):
        radius = ellipse_radius(self.box, u, v)
        dome = sigmoid((1.0 - radius) / np.float32(0.12)) * (1.0 - 0.3 * np.clip(radius, 0.0, 1.0) ** 2)
        core = 0.6 * np.exp(-((radius / np.float32(0.35)) ** 2)) if self.calcified else 0.0
        return self.amplitude * (dome + core)


class Mass(Lesion):
    """A larger lobulated opacity: a dense round mass whose outline bulges in 3-5 lobes."""

    name = "Mass"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rng = self.shape_rng
        self.amplitude = rng.uniform(0.2, 0.32)
        self.lobes = int(rng.integers(3, 6))
        self.lobulation = rng.uniform(0.06, 0.16)
        self.phase = rng.uniform(0, 2 * math.pi)

    def _outline(self, u, v) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        du = (u - np.float32((x0 + x1) / 2)) / np.float32((x1 - x0) / 2)
        dv = (v - np.float32((y0 + y1) / 2)) / np.float32((y1 - y0) / 2)
        angle = np.arctan2(dv, du)
        limit = 1.0 - self.lobulation * 0.5 * (1.0 - np.cos(self.lobes * angle + self.phase))
        return limit - np.sqrt(du**2 + dv**2)

    def alpha(self, u, v):
        return sigmoid(self._outline(u, v) / np.float32(0.05))

    def density(self, u, v, texture, canvas, rows, cols):
        mottle = ValueNoise(texture, self.box, 4, 4)(u, v)
        return self.amplitude * self.alpha(u, v) * (0.9 + 0.1 * mottle)


class Atelectasis(Lesion):
    """Band-like (plate) opacity: a thin oblique ellipse spanning its box, one per lung when bilateral."""

    name = "Atelectasis"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rng = self.shape_rng
        self.amplitude = rng.uniform(0.2, 0.3)
        self.thinness = rng.uniform(0.4, 0.6, size=len(self.parts))
        self.tilts = rng.choice([-1, 1], size=len(self.parts))

    def _bands(self, u, v, edge: float) -> np.ndarray:
        bands = [
            inscribed_ellipse_alpha(
                part, thin * min(part[2] - part[0], part[3] - part[1]) / 2, tilt, u, v, edge
            )
            for part, thin, tilt in zip(self.parts, self.thinness, self.tilts)
        ]
        return np.maximum.reduce(bands)

    def alpha(self, u, v):
        return self._bands(u, v, 0.08)

    def density(self, u, v, texture, canvas, rows, cols):
        streaks = ValueNoise(texture, self.box, 6, 3)(u, v)
        return self.amplitude * self._bands(u, v, 0.15) * (0.85 + 0.15 * streaks)


class Effusion(Lesion):
    """Basal fluid: a dense opacity filling the bottom of its box, its top a meniscus rising outwards."""

    name = "Effusion"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rng = self.shape_rng
        self.amplitude = rng.uniform(0.24, 0.36)
        self.drop = rng.uniform(0.45, 0.85, size=len(self.parts))
        self.power = rng.uniform(1.2, 2.5, size=len(self.parts))

    def _fluid(self, u, v) -> tuple[np.ndarray, np.ndarray]:
        alphas, depths = [], []
        for part, drop, power in zip(self.parts, self.drop, self.power):
            x0, y0, x1, y1 = part
            lateral = x0 if self.lateral_sign(part) < 0 else x1
            towards_medial = np.clip(np.abs(u - np.float32(lateral)) / np.float32(x1 - x0), 0.0, 1.0)
            # Meniscus: the fluid climbs the lateral chest wall to the top of the box.
            surface = y0 + (y1 - y0) * drop * towards_medial**power
            inside = np.minimum(
                np.minimum((v - surface) / np.float32(0.012), (y1 - v) / np.float32(0.01)),
                np.minimum((u - x0) / np.float32(0.008), (x1 - u) / np.float32(0.008)),
            )
            alphas.append(sigmoid(inside))
            depths.append(np.clip((v - surface) / np.float32(0.5 * (y1 - y0)), 0.0, 1.0))
        return np.maximum.reduce(alphas), np.maximum.reduce(depths)

    def alpha(self, u, v):
        return self._fluid(u, v)[0]

    def density(self, u, v, texture, canvas, rows, cols):
        fluid, depth = self._fluid(u, v)
        grain = ValueNoise(texture, self.box, 5, 5)(u, v)
        return self.amplitude * fluid * (0.6 + 0.4 * depth) * (0.92 + 0.08 * grain)


class Infiltration(Lesion):
    """Patchy, ill-defined, faint opacities with a fine reticulonodular texture, in an ellipse per part."""

    name = "Infiltration"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rng = self.shape_rng
        self.amplitude = rng.uniform(0.16, 0.24)
        self.patches = ValueNoise(rng, self.box, 5 * len(self.parts), 5)
        self.cover = rng.uniform(0.2, 0.6)

    def alpha(self, u, v):
        envelope = np.maximum.reduce(
            [sigmoid((1.0 - ellipse_radius(part, u, v)) / np.float32(0.1)) for part in self.parts]
        )
        return envelope * sigmoid((self.patches(u, v) + self.cover) / np.float32(0.2))

    def density(self, u, v, texture, canvas, rows, cols):
        fine = ValueNoise(texture, self.box, 14 * len(self.parts), 14)(u, v)
        return self.amplitude * self.alpha(u, v) * np.clip(0.55 + 0.6 * fine, 0.2, 1.3)


class Pneumonia(Lesion):
    """A confluent, fluffy airspace opacity with soft, irregular margins and a cloudy texture."""

    name = "Pneumonia"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rng = self.shape_rng
        self.amplitude = rng.uniform(0.17, 0.27)
        self.margin = ValueNoise(rng, self.box, 3 * len(self.parts), 3)

    def alpha(self, u, v):
        radius = np.minimum.reduce([ellipse_radius(part, u, v) for part in self.parts])
        limit = 1.0 - 0.12 * (1.0 + np.tanh(1.5 * self.margin(u, v)))
        return sigmoid((limit - radius) / np.float32(0.1))

    def density(self, u, v, texture, canvas, rows, cols):
        cloud = ValueNoise(texture, self.box, 6 * len(self.parts), 6)(u, v)
        return self.amplitude * self.alpha(u, v) * (0.8 + 0.25 * cloud)


class Pneumothorax(Lesion):
    """Air between the chest wall and a collapsed lung: a hyperlucent rim without lung markings.

    The air fills a half ellipse whose flat side is the box's lateral edge; its curved medial border is the
    thin white visceral pleural line, with the slightly denser collapsed lung beyond it.
    """

    name = "Pneumothorax"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rng = self.shape_rng
        self.darkening = rng.uniform(0.09, 0.14)
        self.line = rng.uniform(0.18, 0.26)

    def _radius(self, u, v) -> tuple[np.ndarray, np.ndarray]:
        """Radius of the half ellipse whose flat side is the box's lateral edge, and the distance from it."""
        x0, y0, x1, y1 = self.box
        lateral = x0 if self.lateral_sign(self.box) < 0 else x1
        inward = (u - np.float32(lateral)) * np.float32(-self.lateral_sign(self.box))
        radius = np.sqrt(
            (inward / np.float32(x1 - x0)) ** 2
            + ((v - np.float32((y0 + y1) / 2)) / np.float32((y1 - y0) / 2)) ** 2
        )
        return radius, inward

    def alpha(self, u, v):
        radius, inward = self._radius(u, v)
        return sigmoid((1.0 - radius) / np.float32(0.03)) * sigmoid(inward / np.float32(0.004))

    def paint(self, canvas: Canvas) -> None:
        rows, cols, u, v = canvas.window(expand(self.box, 0.08))
        if u.size == 0 or v.size == 0:
            return
        radius, inward = self._radius(u, v)
        air = self.alpha(u, v)
        scale = min(self.box[2] - self.box[0], (self.box[3] - self.box[1]) / 2)
        pleura = np.exp(-((((radius - 1.0) * scale) / np.float32(0.006)) ** 2)) * sigmoid(
            inward / np.float32(0.004)
        )
        collapsed = sigmoid((radius - 1.0) * scale / np.float32(0.004)) * np.exp(
            -(radius - 1.0) * scale / np.float32(0.02)
        )
        canvas.marking_mask[rows, cols] *= 1.0 - air
        canvas.density[rows, cols] += (
            -self.darkening * air
            + self.line * pleura
            + 0.07 * collapsed * sigmoid(inward / np.float32(0.004))
        )


class Cardiomegaly(Lesion):
    """An enlarged heart; the anatomy draws the heart in this box (``phantom_anatomy.with_heart``)."""

    name = "Cardiomegaly"

    def alpha(self, u, v):
        return heart_alpha(self.box, u, v)

    def paint(self, canvas: Canvas) -> None:
        """Nothing to add: the heart is part of the anatomy layers."""


class Consolidation(Lesion):
    """Dense homogeneous lobar opacity with one straight fissural border and dark air bronchograms inside."""

    name = "Consolidation"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rng = self.shape_rng
        x0, y0, x1, y1 = self.box
        self.amplitude = rng.uniform(0.23, 0.34)
        # A lobe: between an ellipse and a rounded rectangle, its outline a little irregular.
        self.squareness = rng.uniform(2.0, 3.5)
        self.margin = ValueNoise(rng, self.box, 3, 3)
        # The fissure: a straight line at a random angle cutting off ~7-30% of the lobe.
        self.normal = rng.uniform(0, 2 * math.pi)
        self.offset = rng.uniform(0.3, 0.7)
        start = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) + rng.uniform(-0.2, 0.2, size=2) * [x1 - x0, y1 - y0]
        count = int(rng.integers(2, 5))
        angles = rng.uniform(0, 2 * math.pi, size=count)
        lengths = rng.uniform(0.25, 0.45, size=count) * min(x1 - x0, y1 - y0)
        self.bronchi = [
            (start, start + length * np.array([math.cos(a), math.sin(a)]))
            for a, length in zip(angles, lengths)
        ]

    def _region(self, u, v, edge: float) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        du = (u - np.float32((x0 + x1) / 2)) / np.float32((x1 - x0) / 2)
        dv = (v - np.float32((y0 + y1) / 2)) / np.float32((y1 - y0) / 2)
        side = du * np.float32(math.cos(self.normal)) + dv * np.float32(math.sin(self.normal))
        fissure = sigmoid((self.offset - side) / np.float32(0.02))
        radius = (np.abs(du) ** self.squareness + np.abs(dv) ** self.squareness) ** (1.0 / self.squareness)
        limit = 1.0 - 0.08 * (1.0 + np.tanh(1.5 * self.margin(u, v)))
        return sigmoid((limit - radius) / np.float32(edge)) * fissure

    def alpha(self, u, v):
        return self._region(u, v, 0.06)

    def density(self, u, v, texture, canvas, rows, cols):
        region = self._region(u, v, 0.06)
        bronchograms = np.zeros_like(region)
        for start, end in self.bronchi:
            bronchograms = np.maximum(bronchograms, _segment_line(start, end, u, v, 0.005))
        grain = ValueNoise(texture, self.box, 5, 5)(u, v)
        return self.amplitude * region * (0.95 + 0.05 * grain - 0.5 * bronchograms)


class Edema(Lesion):
    """Bilateral perihilar haze (a "bat wing") fading to the periphery, with Kerley B lines at the lung bases.

    Its ``box`` is the region of both lungs; the haze follows the lung fields.
    """

    name = "Edema"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rng, a = self.shape_rng, self.anatomy
        self.amplitude = rng.uniform(0.14, 0.22)
        self.wings = [
            (
                a.mid + side * rng.uniform(0.11, 0.16),
                a.hilum_y + rng.uniform(0.0, 0.06),
                rng.uniform(0.1, 0.15),
                rng.uniform(0.13, 0.2),
            )
            for side in (RIGHT_LUNG, LEFT_LUNG)
        ]
        self.kerley = []
        for side in (RIGHT_LUNG, LEFT_LUNG):
            base = a.base(side)
            for height in rng.uniform(0.04, 0.16, size=int(rng.integers(3, 7))):
                outer = a.mid + side * (a.lateral * 0.97)
                inner = outer - side * rng.uniform(0.025, 0.045)
                self.kerley.append((np.array([outer, base - height]), np.array([inner, base - height])))

    def density(self, u, v, texture, canvas, rows, cols):
        haze = np.maximum.reduce([ellipse_alpha(*wing, u, v, 0.35) for wing in self.wings])
        lines = np.zeros_like(haze)
        for start, end in self.kerley:
            lines = np.maximum(lines, _segment_line(start, end, u, v, 0.0045))
        fluffy = ValueNoise(texture, self.box, 10, 10)(u, v)
        return canvas.lungs[rows, cols] * (self.amplitude * haze * (0.8 + 0.25 * fluffy) + 0.12 * lines)


class Emphysema(Lesion):
    """Bullae (thin-walled air spaces without markings) in the upper zones of hyperinflated lungs.

    The hyperinflation itself (dark, sparsely marked lungs, a low flat diaphragm, a narrow heart) is in the
    anatomy (``phantom_anatomy.emphysematous``); ``box`` is the region of both lungs.
    """

    name = "Emphysema"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rng, a = self.shape_rng, self.anatomy
        self.bullae = []
        for _ in range(int(rng.integers(1, 4))):
            side = rng.choice([RIGHT_LUNG, LEFT_LUNG])
            radius = rng.uniform(0.025, 0.05)
            centre_u = a.mid + side * rng.uniform(a.medial + 0.06, a.lateral - 0.05)
            centre_v = a.apex + rng.uniform(0.06, 0.3)
            self.bullae.append((centre_u, centre_v, radius, radius * rng.uniform(0.8, 1.1)))

    def paint(self, canvas: Canvas) -> None:
        rows, cols, u, v = canvas.window(self.region)
        if u.size == 0 or v.size == 0:
            return
        for centre_u, centre_v, radius_u, radius_v in self.bullae:
            radius = np.sqrt(
                ((u - np.float32(centre_u)) / np.float32(radius_u)) ** 2
                + ((v - np.float32(centre_v)) / np.float32(radius_v)) ** 2
            )
            inside = sigmoid((1.0 - radius) / np.float32(0.08))
            wall = np.exp(-((((radius - 1.0) * radius_u) / np.float32(0.004)) ** 2))
            lungs = canvas.lungs[rows, cols]
            canvas.marking_mask[rows, cols] *= 1.0 - inside
            canvas.density[rows, cols] += lungs * (-0.05 * inside + 0.07 * wall)


class Fibrosis(Lesion):
    """A coarse reticular network (interlacing lines) in both lungs, peripheral and basal or upper-zone."""

    name = "Fibrosis"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rng, a = self.shape_rng, self.anatomy
        self.amplitude = rng.uniform(0.18, 0.28)
        self.upper = rng.random() < 0.3
        depth = rng.uniform(0.3, 0.45) if self.upper else rng.uniform(0.45, 0.6)
        self.level = a.apex + depth * ((a.base_left + a.base_right) / 2 - a.apex)
        self.asymmetry = rng.uniform(0.6, 1.0, size=2)

    def density(self, u, v, texture, canvas, rows, cols):
        a = self.anatomy
        zone = (
            sigmoid((np.float32(self.level) - v) / np.float32(0.04))
            if self.upper
            else sigmoid((v - np.float32(self.level)) / np.float32(0.05))
        )
        across = np.abs(u - np.float32(a.mid))
        peripheral = sigmoid((across - (a.medial + 0.1)) / np.float32(0.03))
        side_gain = np.where(u < a.mid, np.float32(self.asymmetry[0]), np.float32(self.asymmetry[1]))
        # The zero set of a smooth random field is a network of lines.
        field = ValueNoise(texture, self.box, 16, 16)(u, v)
        net = np.exp(-((field / np.float32(0.28)) ** 2))
        return canvas.lungs[rows, cols] * self.amplitude * side_gain * zone * peripheral * net


class PleuralThickening(Lesion):
    """A dense band of irregular thickness lining the inside of the chest wall: lateral, or an apical cap."""

    name = "Pleural_Thickening"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rng, a = self.shape_rng, self.anatomy
        self.amplitude = rng.uniform(0.28, 0.4)
        both = rng.random() < 0.25
        self.sides = [RIGHT_LUNG, LEFT_LUNG] if both else [int(rng.choice([RIGHT_LUNG, LEFT_LUNG]))]
        self.apical = rng.random() < 0.3
        self.thickness = rng.uniform(0.02, 0.038)
        span = (a.base_right + a.base_left) / 2 - a.apex
        start = rng.uniform(0.15, 0.55)
        self.extent = (a.apex + start * span, a.apex + min(1.0, start + rng.uniform(0.25, 0.45)) * span)
        self.irregular = ValueNoise(rng, self.box, 2, 8)

    def density(self, u, v, texture, canvas, rows, cols):
        a = self.anatomy
        total = np.zeros((v.shape[0], u.shape[1]), dtype=np.float32)
        thickness = self.thickness * (0.75 + 0.35 * self.irregular(u, v))
        for side in self.sides:
            inside = lung_distance(a, side, u, v)
            # From just outside the lung edge (the pleura) to ``thickness`` inside it.
            band = sigmoid((inside + 0.006) / np.float32(0.003)) * sigmoid(
                (thickness - inside) / np.float32(0.003)
            )
            if self.apical:
                segment = sigmoid((np.float32(a.apex + 0.1) - v) / np.float32(0.01))
            else:
                segment = sigmoid((v - np.float32(self.extent[0])) / np.float32(0.01)) * sigmoid(
                    (np.float32(self.extent[1]) - v) / np.float32(0.01)
                )
                # Along the lateral wall only, not the mediastinal border.
                segment = segment * sigmoid(
                    (side * (u - np.float32(a.mid)) - (a.medial + 0.12)) / np.float32(0.01)
                )
            total = np.maximum(total, band * segment)
        return self.amplitude * total


class Hernia(Lesion):
    """A hiatal hernia: a round retrocardiac sac above the diaphragm, an air cap over a fluid level inside."""

    name = "Hernia"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        x0, y0, x1, y1 = self.box
        self.centre = ((x0 + x1) / 2, (y0 + y1) / 2)
        self.radii = ((x1 - x0) / 2, (y1 - y0) / 2)
        self.level = self.centre[1] + self.radii[1] * self.shape_rng.uniform(-0.35, 0.3)

    def alpha(self, u, v):
        return ellipse_alpha(*self.centre, *self.radii, u, v, 0.06)

    def density(self, u, v, texture, canvas, rows, cols):
        sac = self.alpha(u, v)
        radius = np.sqrt(
            ((u - np.float32(self.centre[0])) / np.float32(self.radii[0])) ** 2
            + ((v - np.float32(self.centre[1])) / np.float32(self.radii[1])) ** 2
        )
        air = sac * sigmoid((np.float32(self.level) - v) / np.float32(0.003))
        fluid = sac * sigmoid((v - np.float32(self.level)) / np.float32(0.003))
        rim = np.exp(-(((radius - 1.0) / np.float32(0.1)) ** 2))
        return -0.26 * air + 0.06 * fluid + 0.1 * rim


def _segment_line(start: np.ndarray, end: np.ndarray, u, v, width: float) -> np.ndarray:
    """Intensity 0-1 of a line of half-width ``width`` from ``start`` to ``end`` (normalised u, v). [H, W]"""
    direction = end - start
    length_sq = float(direction @ direction) or 1e-12
    along = np.clip(
        ((u - np.float32(start[0])) * direction[0] + (v - np.float32(start[1])) * direction[1]) / length_sq,
        0.0,
        1.0,
    )
    du = u - np.float32(start[0]) - along * np.float32(direction[0])
    dv = v - np.float32(start[1]) - along * np.float32(direction[1])
    return np.exp(-(du**2 + dv**2) / np.float32(width**2)).astype(np.float32)


LESIONS: dict[str, type[Lesion]] = {
    cls.name: cls
    for cls in (
        Atelectasis,
        Cardiomegaly,
        Effusion,
        Infiltration,
        Mass,
        Nodule,
        Pneumonia,
        Pneumothorax,
        Consolidation,
        Edema,
        Emphysema,
        Fibrosis,
        PleuralThickening,
        Hernia,
    )
}


def lesion_region(name: str, anatomy: Anatomy, rng: np.random.Generator) -> Box:
    """Draw the region of a finding WITHOUT box statistics (the 6 classes NIH gave no boxes), from its prior.

    Args:
        name: one of Consolidation, Edema, Emphysema, Fibrosis, Pleural_Thickening, Hernia.
        anatomy: the chest.
        rng: random generator (consumed).

    Returns:
        xyxy normalised region: a lobe-sized area of one lung (Consolidation), a retrocardiac sac just above
        the left hemidiaphragm (Hernia), or the region of both lungs (the diffuse findings).
    """
    a = anatomy
    lungs = (
        a.mid - a.lateral - 0.02,
        a.apex - 0.02,
        a.mid + a.lateral + 0.02,
        max(a.base_left, a.base_right) + 0.02,
    )
    if name == "Consolidation":
        side = rng.choice([RIGHT_LUNG, LEFT_LUNG])
        centre_u = a.mid + side * rng.uniform(0.15, 0.25)
        lower = rng.random() < 0.6
        depth = rng.uniform(0.55, 0.75) if lower else rng.uniform(0.25, 0.5)
        centre_v = a.apex + depth * (a.base(side) - a.apex)
        half_w, half_h = rng.uniform(0.06, 0.11), rng.uniform(0.05, 0.1)
        return (centre_u - half_w, centre_v - half_h, centre_u + half_w, centre_v + half_h)
    if name == "Hernia":
        centre_u = a.mid + rng.uniform(-0.01, 0.05)
        centre_v = a.base_left - rng.uniform(0.04, 0.08)
        half_w = rng.uniform(0.055, 0.085)
        half_h = half_w * rng.uniform(0.7, 0.9)
        return (centre_u - half_w, centre_v - half_h, centre_u + half_w, centre_v + half_h)
    if name in ("Edema", "Emphysema", "Fibrosis", "Pleural_Thickening"):
        return lungs
    raise ValueError(f"{name!r} has box statistics or is not a ChestX-ray14 class; no own prior")
