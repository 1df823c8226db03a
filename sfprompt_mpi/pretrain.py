"""Pre-train a CPU model on formula-driven images: no download, no dataset.

    python -m sfprompt_mpi.pretrain --model vit_micro_patch8_32            # the shipped weights (~6 min, 2 cores)
    python -m sfprompt_mpi.pretrain --model vit_mini_patch4_32 --epochs 4  # the larger CPU model (~10x slower per image)
    python -m sfprompt_mpi.pretrain --classes 4 --per-class 8 --epochs 1 --out /tmp/w   # a smoke test

Formula-driven supervised learning (Kataoka et al. 2020, FractalDB; Nakashima
et al. 2022 and Kataoka et al. 2022 for vision transformers): every class is
one random iterated function system, every image one jittered rendering of
its fractal (:mod:`sfprompt_mpi.data.fractals`), and the model learns to tell
the systems apart. The features it learns (strokes, curvature, texture,
shape at several scales) carry over to natural images far better than a
random initialisation does, which is what the fine-tuning algorithms assume.

Writes ``OUT/<model>.safetensors`` (the backbone without its classifier, which
every task replaces anyway) and ``OUT/<model>.json``: the command, seed, data
recipe, training settings, accuracy on held-out renderings, package version
and the SHA-256 of the weights file. A fixed seed and thread count give the
same file bit for bit. ``--pretrained`` loads the files shipped in
``sfprompt_mpi/model/weights/`` (made by this command with ``--out`` there).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli import end_process
from .errors import EXIT_USER_ERROR, UserError
from .output import write_json

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation of the pre-training; recorded beside the weights."""

    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    threads: int = 1


def build_parser() -> argparse.ArgumentParser:
    from .data.fractals import FractalRecipe

    recipe, train = FractalRecipe(), TrainSettings()
    ap = argparse.ArgumentParser(prog="python -m sfprompt_mpi.pretrain", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="vit_micro_patch8_32", help="a CPU model: vit_micro_patch8_32 or vit_mini_patch4_32")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fractals, the init and the batch order")
    ap.add_argument("--classes", type=int, default=recipe.classes, help="fractal classes (one IFS each)")
    ap.add_argument("--per-class", type=int, default=recipe.train_per_class, help="training images per class")
    ap.add_argument("--val-per-class", type=int, default=recipe.val_per_class, help="held-out images per class")
    ap.add_argument("--epochs", type=int, default=train.epochs, help="passes over the training images")
    ap.add_argument("--batch-size", type=int, default=train.batch_size, help="mini-batch size")
    ap.add_argument("--lr", type=float, default=train.lr, help="peak AdamW learning rate (cosine schedule)")
    ap.add_argument("--threads", type=int, default=train.threads, help="torch threads (part of what makes a run repeatable)")
    ap.add_argument("--out", default=".", help="directory for <model>.safetensors and <model>.json")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.error = _parser_error  # type: ignore[method-assign]
    return ap


def _parser_error(message: str) -> None:
    raise UserError(f"bad command line: {message}")


def pretrain(model: str, recipe: Any, train: TrainSettings, seed: int, out: Path,
             *, command: str, progress: bool = True) -> dict[str, Any]:
    """Pre-train ``model`` on the recipe's fractals and write its weights and record; -> the record."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    from .data.fractals import build_fractal_data
    from .model.vit import SMALL_MODELS

    if model not in SMALL_MODELS:
        raise UserError(f"unknown model {model!r} for pre-training: use one of {', '.join(SMALL_MODELS)}")
    torch.set_num_threads(train.threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    data = build_fractal_data(recipe, seed)
    x_train, y_train = _as_inputs(data["train_x"]), torch.from_numpy(data["train_y"])
    x_val, y_val = _as_inputs(data["val_x"]), torch.from_numpy(data["val_y"])
    vit = VisionTransformer(**SMALL_MODELS[model], num_classes=recipe.classes)
    train_acc = _train(vit, x_train, y_train, train, seed, desc=f"pretrain {model}", progress=progress)
    val_acc = _accuracy(vit, x_val, y_val)
    state = {k: v.detach().contiguous() for k, v in vit.state_dict().items() if not k.startswith("head.")}
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{model}.safetensors"
    # One metadata key: safetensors writes its metadata map in no fixed order, so two keys would make
    # the same tensors two different files (and checksums). The seed and recipe are in the JSON record.
    save_file(state, str(weights), metadata={"model": model})
    record = {
        "model": model,
        "command": command,
        "seed": seed,
        "data": recipe.to_dict(),
        "training": asdict(train),
        "pretraining_accuracy": {"train_last_epoch": round(train_acc, 4),
                                 "val_heldout_renderings": round(val_acc, 4),
                                 "chance": round(1 / recipe.classes, 4)},
        "classifier": "dropped: the file holds the backbone only; every task gets a new classifier",
        "parameters": int(sum(v.numel() for v in state.values())),
        "seconds": round(time.perf_counter() - t0, 1),
        "package_version": _package_version(),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "weights_file": weights.name,
        "sha256": sha256_file(weights),
    }
    write_json(out / f"{model}.json", record, indent=2)
    return record


def _train(vit, x_train, y_train, train: TrainSettings, seed: int, *, desc: str, progress: bool) -> float:
    """AdamW with warm-up and a cosine schedule over ``train.epochs`` epochs; -> the last epoch's accuracy."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    def decays(n: str, p) -> bool:
        return p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n

    opt = torch.optim.AdamW([{"params": [p for n, p in vit.named_parameters() if decays(n, p)],
                              "weight_decay": train.weight_decay},
                             {"params": [p for n, p in vit.named_parameters() if not decays(n, p)],
                              "weight_decay": 0.0}], lr=train.lr)
    steps_per_epoch = math.ceil(len(y_train) / train.batch_size)
    total, warmup = train.epochs * steps_per_epoch, max(1, int(train.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    order_gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, file=sys.stderr)
    correct = seen = 0
    for epoch in range(train.epochs):
        vit.train()
        correct = seen = 0
        for idx in torch.randperm(len(y_train), generator=order_gen).split(train.batch_size):
            logits_BK = vit(x_train[idx])
            loss = F.cross_entropy(logits_BK, y_train[idx], label_smoothing=train.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits_BK.argmax(1) == y_train[idx]).sum())
            seen += len(idx)
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
    bar.close()
    return correct / max(seen, 1)


def _as_inputs(images_NSS) -> torch.Tensor:
    """Grayscale [0, 1] renderings -> N x 3 x S x S in [-1, 1], as the datasets serve images."""
    import torch

    x = torch.from_numpy(images_NSS).unsqueeze(1)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def _accuracy(vit, x, y) -> float:
    import torch

    if len(y) == 0:
        return float("nan")
    vit.eval()
    with torch.no_grad():
        hits = sum(int((vit(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(512), y.split(512)))
    return hits / len(y)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sfprompt_mpi")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    from .data.fractals import FractalRecipe

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        for flag in ("classes", "per_class", "epochs", "batch_size", "threads"):
            if getattr(args, flag) < 1:
                raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if args.val_per_class < 0 or not args.lr > 0:
            raise UserError("--val-per-class must be >= 0 and --lr > 0")
        recipe = FractalRecipe(classes=args.classes, train_per_class=args.per_class, val_per_class=args.val_per_class)
        train = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, threads=args.threads)
        command = " ".join(["python -m sfprompt_mpi.pretrain", *argv])
        record = pretrain(args.model, recipe, train, args.seed, Path(args.out), command=command, progress=not args.quiet)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    acc = record["pretraining_accuracy"]
    print(f"{record['model']}: held-out accuracy {acc['val_heldout_renderings']:.4f} on {args.classes} fractal "
          f"classes (chance {acc['chance']:.4f}) in {record['seconds']:.0f} s; wrote "
          f"{Path(args.out) / record['weights_file']} (sha256 {record['sha256'][:12]}...)")
    return 0


if __name__ == "__main__":
    end_process(main())
