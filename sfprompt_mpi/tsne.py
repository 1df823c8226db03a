"""t-SNE of the tail's pooled test-set features before and after fine-tuning (SFPrompt's Figures 3-6).

    python -m sfprompt_mpi.analyze runs/a --tsne                     # -> runs/a/analysis/tsne.png, tsne_untuned.png
    python -m sfprompt_mpi.analyze runs/a runs/b --tsne --tsne-samples 500

The features are the model's pre-logits: the tail's final norm and pooling,
right before the classifier (``PromptedViT.embed``). Two models per run:

- **untuned**: the run's starting weights, built from its ``config.toml``
  exactly as the run builds them before round 1 (same seed, backbone
  weights, prompts and adapters as initialised);
- **tuned**: that model with the trained tensors of ``RUN_DIR/checkpoint``
  (the last completed round), as ``--resume`` loads them.

Both see the same test images: at most ``--tsne-samples`` of the run's test
set (as the run loaded it, ``max_test_samples`` included), drawn with a fixed
seed, so every run of one dataset shows the same images. Separability is
given three ways: the leave-one-out 5-NN accuracy in the 2-D embedding, the
silhouette score of the classes in the 2-D embedding (-1..1), and the
cross-validated accuracy of a logistic-regression probe on the features
themselves (what "linearly separable" asks).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import UserError

KNN_K = 5
#: The fixed seed of the test-image sample, so runs of one dataset are shown on the same images.
SAMPLE_SEED = 0


@dataclass
class RunSetup:
    """What one run's t-SNE needs, checked before any heavy work: its config and trained tensors."""

    path: Path
    cfg: Any  # Config
    tensors: dict  # name -> trained tensor of the last checkpoint
    round: int


def check_run(path: Path) -> RunSetup:
    """The run's config, checkpoint and dataset files, or one UserError naming what is missing."""
    from .config import config_from_dict, load_toml
    from .data.datasets import check_dataset_files
    from .fed.checkpoint import load_checkpoint
    from .model.weights import check_pretrained_available

    cfg = config_from_dict(load_toml(path / "config.toml"))
    if not (path / "checkpoint").is_dir():
        raise UserError(f"{path} has no checkpoint (no completed round): nothing to show as the tuned model")
    tensors, state = load_checkpoint(path / "checkpoint")
    try:
        check_dataset_files(cfg.data)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).is_file():
        raise UserError(f"{path}: the run's model checkpoint {cfg.model.checkpoint} does not exist")
    if cfg.model.pretrained and not cfg.model.checkpoint:
        check_pretrained_available(cfg.model.name)
    return RunSetup(path, cfg, tensors, int(state["round"]))


def build_models(setup: RunSetup):
    """-> (untuned model, tuned model, test set) of a run, the models in eval mode."""
    from .algorithms import build_algorithm
    from .data.datasets import build_data
    from .fed.checkpoint import check_compatible
    from .model.vit import build_backbone

    cfg = setup.cfg
    image_size = build_backbone(cfg.model, num_classes=2, meta=True).patch_embed.img_size[0]
    data = build_data(cfg.data, image_size, cfg.run.seed)
    algo = build_algorithm(cfg)
    untuned = algo.build_model(data.num_classes, quiet=True).eval()
    tuned = algo.build_model(data.num_classes, quiet=True).eval()
    params = dict(tuned.named_parameters())
    names = [*algo.trained_names(tuned), *algo.server_trained_names(tuned)]
    where = str(setup.path / "checkpoint")
    check_compatible(setup.tensors, {n: tuple(params[n].shape) for n in names}, where)
    for n in names:
        params[n].data.copy_(setup.tensors[n])
    return untuned, tuned, data.test


def sample_indices(n: int, cap: int) -> np.ndarray:
    """At most ``cap`` of ``range(n)``, sorted, drawn with :data:`SAMPLE_SEED` (all of them when n <= cap)."""
    if cap <= 0 or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(SAMPLE_SEED).permutation(n)[:cap])


def extract_features(model, dataset, indices: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """-> (pre-logits ``feats_ND``, labels ``N``) of ``dataset[indices]``."""
    import torch
    from .fed.training import take_batch

    feats, labels = [], []
    with torch.no_grad():
        for start in range(0, len(indices), batch):
            images_BCHW, labels_B = take_batch(dataset, indices[start:start + batch].tolist())
            feats.append(model.embed(images_BCHW).float().numpy())
            labels.append(labels_B.numpy())
    return np.concatenate(feats), np.concatenate(labels)


def embed_2d(feats_ND: np.ndarray, seed: int) -> np.ndarray:
    """Seeded t-SNE of the features -> ``xy_N2``."""
    from sklearn.manifold import TSNE
    n = len(feats_ND)
    if n < 3:
        raise UserError(f"t-SNE needs at least 3 test images, got {n}; raise --tsne-samples or max_test_samples")
    perplexity = min(30.0, (n - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(feats_ND.astype(np.float64))


def separability(xy_N2: np.ndarray, feats_ND: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Leave-one-out 5-NN accuracy and silhouette in 2-D; a cross-validated linear probe on the features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import NearestNeighbors
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n, classes = len(labels), np.unique(labels)
    k = min(KNN_K, n - 1)
    _, nn = NearestNeighbors(n_neighbors=k + 1).fit(xy_N2).kneighbors(xy_N2)
    votes = labels[nn[:, 1:]]  # the first neighbour is the point itself
    pred = np.array([np.bincount(v, minlength=labels.max() + 1).argmax() for v in votes])
    out: dict[str, float | None] = {"knn_acc_2d": float((pred == labels).mean()),
                                    "silhouette_2d": None, "linear_probe_acc": None}
    if 2 <= len(classes) <= n - 1:
        out["silhouette_2d"] = float(silhouette_score(xy_N2, labels))
    folds = min(5, int(np.bincount(labels)[classes].min()))
    if folds >= 2:
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        cv = StratifiedKFold(folds, shuffle=True, random_state=SAMPLE_SEED)
        out["linear_probe_acc"] = float(cross_val_score(probe, feats_ND, labels, cv=cv).mean())
    return out


def plot_embedding(xy_N2: np.ndarray, labels: np.ndarray, title: str, path: Path) -> None:
    """One scatter plot of the 2-D embedding, one colour per class."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    classes = np.unique(labels)
    if classes.max() < 20:  # one colour per class index, the same in every plot
        cmap = colormaps["tab10" if classes.max() < 10 else "tab20"]
        for c in classes:
            ax.scatter(xy_N2[labels == c, 0], xy_N2[labels == c, 1], color=cmap(int(c)), s=6, alpha=0.8, label=str(c))
        ax.legend(title="class", fontsize="x-small", markerscale=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.scatter(xy_N2[:, 0], xy_N2[:, 1], c=labels, cmap="viridis", s=6, alpha=0.8)
    ax.set(title=title, xticks=[], yticks=[])
    ax.title.set_fontsize("small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@dataclass
class Embedded:
    """One model's t-SNE: the sampled test indices, labels, features, coordinates and separability."""

    indices: np.ndarray
    labels: np.ndarray
    feats: np.ndarray
    xy: np.ndarray
    scores: dict[str, float | None]


def features_of(model, dataset, indices: np.ndarray, what: str,
                progress: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
    """``extract_features`` with a progress line before and after."""
    t0 = time.perf_counter()
    progress(f"{what}: features of {len(indices)} test images ...")
    feats, labels = extract_features(model, dataset, indices)
    progress(f"{what}: features in {time.perf_counter() - t0:.1f} s, t-SNE ...")
    return feats, labels


def embedded(indices: np.ndarray, feats: np.ndarray, labels: np.ndarray, seed: int) -> Embedded:
    """t-SNE and separability of one model's features."""
    xy = embed_2d(feats, seed)
    return Embedded(indices, labels, feats, xy, separability(xy, feats, labels))


def _title(algo: str, which: str, scores: dict[str, float | None]) -> str:
    probe = scores["linear_probe_acc"]
    return (f"{algo}: {which}\n{KNN_K}-NN acc (2-D) {scores['knn_acc_2d']:.3f}"
            + (f", linear probe {probe:.3f}" if probe is not None else ""))


def _embed_run(setup: RunSetup, label: str, cap: int, seed: int, untuned_seen: list[Embedded],
               progress: Callable[[str], None]) -> tuple[Embedded, Embedded]:
    """(tuned, untuned) embeddings of one run; an untuned model whose features equal an earlier
    run's (the same starting model) reuses that run's embedding."""
    untuned_model, tuned_model, test = build_models(setup)
    indices = sample_indices(len(test), cap)
    tuned = embedded(indices, *features_of(tuned_model, test, indices, f"t-SNE {label}, round {setup.round}",
                                           progress), seed)
    feats, labels = features_of(untuned_model, test, indices, f"t-SNE {label}, untuned", progress)
    same = next((e for e in untuned_seen if e.feats.shape == feats.shape and np.array_equal(e.feats, feats)), None)
    if same is None:
        same = embedded(indices, feats, labels, seed)
        untuned_seen.append(same)
    return tuned, same


def run_tsne(setups: list[tuple[str, str, RunSetup]], out: Path, cap: int, seed: int,
             progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """t-SNE of every (label, algorithm, run) before and after tuning into ``out``; -> label -> summary keys.

    Writes ``tsne.png`` (one run) or ``tsne-<label>.png`` per run, ``tsne_untuned.png`` (one per distinct
    starting model: ``tsne_untuned-<label>.png`` when the runs started from different models, e.g. with
    and without prompts) and ``tsne.csv`` (run, model, test index, label, x, y)."""
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    untuned_seen: list[Embedded] = []
    done = [(label, algo, setup, *_embed_run(setup, label, cap, seed, untuned_seen, progress))
            for label, algo, setup in setups]
    rows: list[tuple] = []
    results: dict[str, dict[str, Any]] = {}
    untuned_png: dict[int, str] = {}  # runs that share a starting model share its plot
    for label, algo, setup, tuned, untuned in done:
        png = "tsne.png" if len(setups) == 1 else f"tsne-{label}.png"
        which = f"after round {setup.round}" + ("" if label == algo else f" ({label})")
        plot_embedding(tuned.xy, tuned.labels, _title(algo, which, tuned.scores), out / png)
        if id(untuned) not in untuned_png:
            untuned_png[id(untuned)] = "tsne_untuned.png" if len(untuned_seen) == 1 else f"tsne_untuned-{label}.png"
            algos = ", ".join(dict.fromkeys(a for _, a, _, _, u in done if u is untuned))
            plot_embedding(untuned.xy, untuned.labels, _title(algos, "before fine-tuning", untuned.scores),
                           out / untuned_png[id(untuned)])
        for which, e in (("tuned", tuned), ("untuned", untuned)):
            rows += [(label, which, int(i), int(y), float(a), float(b))
                     for i, y, (a, b) in zip(e.indices, e.labels, e.xy)]
        results[label] = {"tsne_samples": len(tuned.labels), "tsne_png": png,
                          "tsne_untuned_png": untuned_png[id(untuned)],
                          **{f"{k}_tuned": v for k, v in tuned.scores.items()},
                          **{f"{k}_untuned": v for k, v in untuned.scores.items()}}
    _write_csv(rows, out / "tsne.csv")
    return results


def _write_csv(rows: list[tuple], path: Path) -> None:
    import csv
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "model", "test_index", "label", "x", "y"])
        w.writerows(rows)
