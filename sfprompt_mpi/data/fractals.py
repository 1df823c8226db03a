"""Formula-driven images: FractalDB-style iterated-function-system fractals.

Each class is one iterated function system (IFS): 2 to 4 random affine maps
``x -> A_i x + b_i`` of the plane, picked with probability proportional to
``|det A_i|`` (Kataoka et al., "Pre-training without Natural Images", ACCV
2020). An image of the class is the IFS's attractor, drawn by the chaos game,
scaled into the frame and rasterised. Instances of a class differ as in
FractalDB: every map's parameters are jittered slightly, the image is flipped
at random, and scale, position and brightness vary a little.

Everything is a pure function of the seed (NumPy's PCG64 streams), needs no
download, and renders tens of thousands of 32-px images in seconds. Legend:
K classes, M maps per system (padded to ``MAX_MAPS``), N images, C chaos-game
chains per image, S side in pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MAX_MAPS = 4


@dataclass(frozen=True)
class FractalRecipe:
    """How a formula-driven data set is made; recorded beside the weights."""

    classes: int = 100
    train_per_class: int = 200
    val_per_class: int = 20
    image_size: int = 32
    min_maps: int = 2
    max_maps: int = MAX_MAPS
    max_singular: float = 0.9    # contractive maps only: the chaos game converges
    min_fill: float = 0.06       # FractalDB's filling-rate filter, on the rendered image
    max_fill: float = 0.5
    jitter: float = 0.04         # std of the per-instance noise on every map parameter
    chains: int = 96             # chaos-game chains per image ...
    steps: int = 48              # ... and steps per chain (the first 8 are discarded)

    def to_dict(self) -> dict:
        return {"kind": "ifs-fractals (FractalDB-style)", **asdict(self)}


def sample_systems(recipe: FractalRecipe, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """K accepted systems -> (maps_KM23: [A | b] per map, probs_KM; padded maps have probability 0).

    A candidate is kept when its rendering fills between ``min_fill`` and
    ``max_fill`` of the image, so no class is a dot or a smear.
    """
    maps, probs = [], []
    while len(maps) < recipe.classes:
        m = int(rng.integers(recipe.min_maps, recipe.max_maps + 1))
        params_M23 = rng.uniform(-1.0, 1.0, size=(m, 2, 3))
        if np.linalg.svd(params_M23[:, :, :2], compute_uv=False).max() > recipe.max_singular:
            continue
        padded = np.zeros((MAX_MAPS, 2, 3))
        padded[:m] = params_M23
        p = np.zeros(MAX_MAPS)
        p[:m] = np.abs(np.linalg.det(params_M23[:, :, :2])) + 1e-3
        p /= p.sum()
        probe = render(padded[None], p[None], recipe, rng, jitter=False)
        fill = float((probe > 0).mean())
        if recipe.min_fill <= fill <= recipe.max_fill:
            maps.append(padded)
            probs.append(p)
    return np.stack(maps), np.stack(probs)


def render(maps_NM23: np.ndarray, probs_NM: np.ndarray, recipe: FractalRecipe,
           rng: np.random.Generator, *, jitter: bool = True) -> np.ndarray:
    """One image per system -> float32 ``N x S x S`` in [0, 1] (chaos game, drawn at 2x and pooled)."""
    n, s, c = len(maps_NM23), recipe.image_size, recipe.chains
    params = maps_NM23.copy()
    if jitter:
        params += rng.normal(0.0, recipe.jitter, size=params.shape) * (probs_NM > 0)[:, :, None, None]
    cum_NM = np.cumsum(probs_NM, axis=1)
    pts_NC2 = rng.uniform(-1.0, 1.0, size=(n, c, 2))
    burn = 8
    trace = np.empty((n, c, recipe.steps - burn, 2))
    rows = np.arange(n)[:, None]
    for t in range(recipe.steps):
        u_NC = rng.uniform(size=(n, c))
        k_NC = np.minimum((u_NC[:, :, None] > cum_NM[:, None, :]).sum(-1), MAX_MAPS - 1)
        p_NC23 = params[rows, k_NC]
        x_NC, y_NC = pts_NC2[..., 0], pts_NC2[..., 1]
        pts_NC2 = np.stack([p_NC23[..., 0, 0] * x_NC + p_NC23[..., 0, 1] * y_NC + p_NC23[..., 0, 2],
                            p_NC23[..., 1, 0] * x_NC + p_NC23[..., 1, 1] * y_NC + p_NC23[..., 1, 2]], axis=-1)
        pts_NC2 = np.clip(pts_NC2, -1e3, 1e3)  # a jittered map may stop contracting
        if t >= burn:
            trace[:, :, t - burn] = pts_NC2
    pts_NP2 = trace.reshape(n, -1, 2)
    lo, hi = np.quantile(pts_NP2, 0.005, axis=1), np.quantile(pts_NP2, 0.995, axis=1)  # N x 2
    centre, half = (lo + hi) / 2, (hi - lo).max(axis=1, keepdims=True) / 2 + 1e-6
    scale = rng.uniform(0.75, 0.95, size=(n, 1)) if jitter else np.full((n, 1), 0.9)
    shift = rng.uniform(-0.08, 0.08, size=(n, 2)) if jitter else np.zeros((n, 2))
    unit_NP2 = (pts_NP2 - centre[:, None]) / half[:, None] * scale[:, None] + shift[:, None]
    if jitter:
        flip = rng.integers(0, 2, size=(n, 2)) * 2 - 1
        unit_NP2 = unit_NP2 * flip[:, None]
    big = 2 * s
    ij_NP2 = np.floor((unit_NP2 + 1) / 2 * big).astype(np.int64)
    ok_NP = ((ij_NP2 >= 0) & (ij_NP2 < big)).all(-1)
    img_NSS = np.zeros((n, big * big), dtype=np.float32)
    flat = ij_NP2[..., 1] * big + ij_NP2[..., 0]
    nn, pp = np.nonzero(ok_NP)
    img_NSS[nn, flat[nn, pp]] = 1.0
    img_NSS = img_NSS.reshape(n, s, 2, s, 2).mean(axis=(2, 4))
    if jitter:
        img_NSS *= rng.uniform(0.6, 1.0, size=(n, 1, 1)).astype(np.float32)
    return img_NSS


def build_fractal_data(recipe: FractalRecipe, seed: int) -> dict[str, np.ndarray]:
    """Train and validation images and labels of the recipe, a pure function of ``seed``.

    -> {"train_x": N x S x S float32, "train_y": N int64, "val_x", "val_y"}.
    """
    sys_rng, train_rng, val_rng = (np.random.default_rng([seed, 15, i]) for i in range(3))
    maps_KM23, probs_KM = sample_systems(recipe, sys_rng)
    out = {}
    for split, per_class, rng in (("train", recipe.train_per_class, train_rng),
                                  ("val", recipe.val_per_class, val_rng)):
        labels = np.repeat(np.arange(recipe.classes), per_class)
        images = [render(maps_KM23[labels[i:i + 2048]], probs_KM[labels[i:i + 2048]], recipe, rng)
                  for i in range(0, len(labels), 2048)]
        out[f"{split}_x"] = np.concatenate(images) if images else np.zeros((0, recipe.image_size, recipe.image_size), np.float32)
        out[f"{split}_y"] = labels
    return out
