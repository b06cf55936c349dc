"""The built-in synthetic dataset: shapes on cluttered backgrounds, generated from a seed.

No files and no network: the quickstart and the tests train on it. A source like the on-disk
layouts of :mod:`distill.data.layouts` (``load(index)`` gives the raw image and mask).
"""

from __future__ import annotations

import numpy as np

from distill.data.files import DataError, Palette, label_colormap


_MEMO: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_memo_bytes = [0]
_MEMO_LIMIT = 256 << 20


class SyntheticShapes:
    """The built-in dataset: shapes on cluttered backgrounds, generated from a seed, no files.

    Class 0 is background: a colour field with noise, lines and blobs in background-like colours.
    Classes 1.. are (shape, pattern) pairs such as "circle_stripes" or "square_dots": every shape
    and every pattern belongs to several classes and colours are random, so only the combination
    of outline and texture tells the class. Shapes vary in size and angle and occlude each other.
    Sample ``index`` of ``split`` is a pure function of ``(config.seed, split, index)``; the splits
    ``train``, ``val`` and ``test`` use different streams.
    """

    SPLITS = {"train": 0, "val": 1, "test": 2, "unlabelled": 3}  # one random stream each
    COMBOS = (("circle", "stripes"), ("square", "dots"), ("triangle", "solid"),
              ("circle", "dots"), ("square", "stripes"), ("triangle", "stripes"),
              ("circle", "solid"), ("square", "solid"), ("triangle", "dots"),
              ("circle", "checker"), ("square", "checker"), ("triangle", "checker"))

    def __init__(self, config, split: str, *, max_samples: int | None = None, **_: object):
        if split not in self.SPLITS:
            raise DataError(f"synthetic split '{split}' does not exist; use one of "
                            f"{', '.join(self.SPLITS)}")
        self.config = config
        self.split = split
        count = config.num_train if split == "train" else config.num_val
        self.count = min(count, max_samples) if max_samples else count
        self.height, self.width = config.size
        self.num_classes = config.num_classes
        self._yy, self._xx = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        # Bilinear upsampling matrices for a smooth 4x4 colour field (cheaper than PIL per image).
        self._up_y = self._interp_matrix(self.height, 4)
        self._up_x = self._interp_matrix(self.width, 4)

    @classmethod
    def class_names(cls, num_classes: int) -> list[str]:
        return ["background"] + [f"{shape}_{pattern}"
                                 for shape, pattern in cls.COMBOS[: num_classes - 1]]

    @staticmethod
    def palette(num_classes: int) -> Palette:
        return label_colormap(num_classes)

    @staticmethod
    def _interp_matrix(size: int, knots: int) -> np.ndarray:
        position = np.linspace(0, knots - 1, size)
        low = np.minimum(position.astype(int), knots - 2)
        weight = np.zeros((size, knots), dtype=np.float32)
        weight[np.arange(size), low] = 1 - (position - low)
        weight[np.arange(size), low + 1] = position - low
        return weight

    def __len__(self) -> int:
        return self.count

    def sample_id(self, index: int) -> str:
        return f"synthetic/{self.split}/{index:06d}"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw sample: uint8 RGB image [H, W, 3] and int64 mask [H, W]."""
        # A sample is a pure function of its key, and generating one costs about as much as a
        # small student's step spends on it: each is made once per process and kept (copies go
        # out, so no caller can change the kept one), up to _MEMO_LIMIT bytes.
        key = (self.config.seed, self.split, index, self.height, self.width, self.num_classes)
        kept = _MEMO.get(key)
        if kept is None:
            kept = self._generate(index)
            size = kept[0].nbytes + kept[1].nbytes
            if _memo_bytes[0] + size <= _MEMO_LIMIT:
                _MEMO[key] = kept
                _memo_bytes[0] += size
        return kept[0].copy(), kept[1].copy()

    def _generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        seed = self.config.seed % (1 << 64)
        rng = np.random.default_rng([seed, self.SPLITS[self.split], index])
        image = self._background(rng)
        mask = np.zeros((self.height, self.width), dtype=np.int64)
        size = min(self.height, self.width)
        for _ in range(int(rng.integers(2, 6))):
            label = int(rng.integers(1, self.num_classes))
            shape, pattern = self.COMBOS[label - 1]
            radius = size * rng.uniform(0.1, 0.28)
            cy, cx = rng.uniform(-0.1, 1.1, 2) * (self.height, self.width)
            angle, pattern_angle = rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
            period = rng.uniform(5.0, 9.0)  # of the stripes, dots or checks, in pixels
            colour = rng.uniform(0, 1, 3).astype(np.float32)
            # The pattern colour differs from the body colour by a clear brightness/hue step.
            second = np.clip(colour + rng.choice([-1, 1], 3) * rng.uniform(0.35, 0.6, 3), 0, 1)
            # Rasterise inside the shape's bounding box only (a few times fewer pixels).
            reach = 1.25 * radius + 1
            top, bottom = max(0, int(cy - reach)), min(self.height, int(cy + reach) + 1)
            left, right = max(0, int(cx - reach)), min(self.width, int(cx + reach) + 1)
            if top >= bottom or left >= right:
                continue
            box = (slice(top, bottom), slice(left, right))
            yy, xx = self._yy[box], self._xx[box]
            inside = self._shape(shape, yy - cy, xx - cx, radius, angle)
            marks = inside & self._pattern(pattern, yy, xx, pattern_angle, period)
            image[box][inside] = colour
            image[box][marks] = second.astype(np.float32)
            mask[box][inside] = label
        image += 0.03 * rng.standard_normal(image.shape, dtype=np.float32)
        return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        base = rng.uniform(0.2, 0.8, 3).astype(np.float32)
        field = rng.normal(0, 0.15, (4, 4, 3)).astype(np.float32)
        # Separable bilinear upsampling as two small matmuls (einsum over three operands is slow).
        rows = (self._up_y @ field.reshape(4, 12)).reshape(self.height, 4, 3).transpose(0, 2, 1)
        image = base + (rows @ self._up_x.T).transpose(0, 2, 1)
        yy, xx = self._yy, self._xx
        for _ in range(int(rng.integers(2, 6))):  # lines in background-like colours
            (y0, y1), (x0, x1) = rng.uniform(0, self.height, 2), rng.uniform(0, self.width, 2)
            dy, dx = y1 - y0, x1 - x0
            t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
            near = (yy - y0 - t * dy) ** 2 + (xx - x0 - t * dx) ** 2 < rng.uniform(0.5, 2.5) ** 2
            image[near] = base + rng.normal(0, 0.2, 3).astype(np.float32)
        for _ in range(int(rng.integers(1, 4))):  # soft blobs
            cy, cx = rng.uniform(0, 1, 2) * (self.height, self.width)
            ry, rx = rng.uniform(0.05, 0.2, 2) * min(self.height, self.width)
            blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            image[blob] = base + rng.normal(0, 0.2, 3).astype(np.float32)
        return image

    @staticmethod
    def _shape(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float, angle: float
               ) -> np.ndarray:
        cos, sin = np.cos(angle), np.sin(angle)
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        if shape == "circle":
            return u * u + v * v <= radius * radius
        if shape == "square":
            return np.maximum(np.abs(u), np.abs(v)) <= radius * 0.85
        # Equilateral triangle of circumradius 1.25 * radius: three half-planes at the inradius.
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            phi = np.pi / 2 + 2 * np.pi * k / 3
            inside &= u * np.cos(phi) + v * np.sin(phi) <= 0.625 * radius
        return inside

    @staticmethod
    def _pattern(pattern: str, yy: np.ndarray, xx: np.ndarray, angle: float, period: float
                 ) -> np.ndarray | bool:
        if pattern == "solid":
            return False
        a = (xx * np.cos(angle) + yy * np.sin(angle)) / period
        if pattern == "stripes":
            return a % 1.0 < 0.5
        b = (yy * np.cos(angle) - xx * np.sin(angle)) / period
        if pattern == "checker":
            return (np.floor(a) + np.floor(b)) % 2 == 0
        return (a % 1.0 - 0.5) ** 2 + (b % 1.0 - 0.5) ** 2 < 0.3**2  # dots
