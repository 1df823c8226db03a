"""Atomic checkpoints of the global trainable tensors.

``checkpoint/global.safetensors`` holds the tensors; ``checkpoint/state.json``
holds the completed round, the seed, and the SHA-256 of the tensor file. The
JSON is replaced last, so it always describes a complete tensor file; a
mismatching hash means a torn or corrupted checkpoint and is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

TENSORS = "global.safetensors"
STATE = "state.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], *, round: int,
                    seed: int, extra: dict | None = None) -> None:
    """Write the global state after ``round`` completed rounds."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(directory / TENSORS, lambda p: save_file(cpu, str(p)))
    state = {"round": round, "seed": seed, "sha256": _sha256(directory / TENSORS),
             "rng": "every generator derives from (seed, round, client)", **(extra or {})}
    _atomic_write(directory / STATE, lambda p: p.write_text(json.dumps(state, indent=1)))


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint directory, or UserError naming what is wrong."""
    directory = Path(directory)
    state_path, tensor_path = directory / STATE, directory / TENSORS
    if not state_path.is_file() or not tensor_path.is_file():
        raise UserError(f"no checkpoint in {directory} (expected {STATE} and {TENSORS})")
    try:
        state = json.loads(state_path.read_text())
        int(state["round"]), state["sha256"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"checkpoint {state_path} is corrupt (unreadable JSON or missing fields)") from None
    if _sha256(tensor_path) != state["sha256"]:
        raise UserError(f"checkpoint {tensor_path} is corrupt (its SHA-256 does not match {STATE})")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:
        raise UserError(f"checkpoint {tensor_path} cannot be read ({type(exc).__name__})") from None
    return tensors, state


def check_compatible(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse a checkpoint whose tensors do not match this config's trainable layout."""
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:1] or sorted(set(tensors) - set(expected))[:1]
        raise UserError(f"checkpoint {where} is from a different config (tensor {missing[0]} differs); "
                        f"resume with the run's own config.toml")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise UserError(f"checkpoint {where} is from a different config ({name} has shape "
                            f"{tuple(tensors[name].shape)}, expected {tuple(shape)})")
