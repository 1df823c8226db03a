"""Building the backbone: any timm VisionTransformer, plus small CPU models.

Weights come from a local file (``checkpoint``: a timm ``.pth``/``.bin``
state dict or a ``.safetensors`` file), else with ``pretrained`` (the
default) from timm's own pretrained loading or, for the CPU models, from the
weights shipped in ``weights/`` (pre-trained on formula-driven fractals by
``python -m sfprompt_mpi.pretrain``; checked against the SHA-256 in the JSON
record beside them), else (``--no-pretrained``) from a seeded random init,
with a one-line warning. The classifier is always new, sized for the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from ..config import ModelConfig
from ..errors import UserError

log = logging.getLogger(__name__)

#: Small 32-px models for CPU work and tests: name -> VisionTransformer kwargs.
SMALL_MODELS: dict[str, dict] = {
    "vit_micro_patch8_32": dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0, init_values=0.1),
    "vit_mini_patch4_32": dict(img_size=32, patch_size=4, embed_dim=128, depth=8, num_heads=4, mlp_ratio=4.0),
}

#: Where the CPU models' pre-trained weights ship: ``<name>.safetensors`` plus its ``<name>.json`` record.
SHIPPED_WEIGHTS = Path(__file__).parent / "weights"


def model_depth_and_size(name: str) -> tuple[int, int]:
    """(depth, input image size) of a model name without building it."""
    vit = build_backbone(ModelConfig(name=name), num_classes=2, quiet=True, meta=True)
    return len(vit.blocks), vit.patch_embed.img_size[0]


def build_backbone(cfg: ModelConfig, num_classes: int, *, quiet: bool = False, meta: bool = False) -> VisionTransformer:
    """The timm VisionTransformer named by ``cfg.name`` with a ``num_classes`` classifier.

    ``meta=True`` builds on the meta device (shapes only, no memory, no weights).
    """
    name = cfg.name
    base = name.split(".")[0]
    kwargs = dict(num_classes=num_classes)
    if meta:
        with torch.device("meta"):
            return _create(name, base, pretrained=False, meta=True, **kwargs)
    if cfg.checkpoint:  # an explicit file wins over the (default-on) pretrained weights
        vit = _create(name, base, pretrained=False, **kwargs)
        load_backbone_weights(vit, cfg.checkpoint)
        return vit
    if cfg.pretrained:
        if base in SMALL_MODELS:
            vit = _create(name, base, pretrained=False, **kwargs)
            load_backbone_weights(vit, shipped_weights(base))
            return vit
        with torch.device("meta"):  # a wrong name is "unknown model", not a failed download
            _create(name, base, pretrained=False, meta=True, **kwargs)
        try:
            return _create(name, base, pretrained=True, **kwargs)
        except UserError:
            raise
        except Exception as exc:  # timm raises a zoo of network/file errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"could not load pretrained weights for {name} ({first}); "
                            f"cache them (HF_HOME), pass --checkpoint FILE, or --no-pretrained for random weights") from None
    if not quiet:
        log.warning("--no-pretrained and no --checkpoint: %s starts from random weights", name)
    return _create(name, base, pretrained=False, **kwargs)


def _create(name: str, base: str, *, pretrained: bool, meta: bool = False, **kwargs) -> VisionTransformer:
    """``meta``: on the meta device, where timm's weight init would only cost time (its truncated
    normal goes through torch's Python reference kernels, about 0.3 s per model, and imports sympy, 0.7 s
    more): skipped, as timm's ``weight_init='skip'`` allows."""
    if meta:
        kwargs["weight_init"] = "skip"
    if base in SMALL_MODELS:
        return VisionTransformer(**SMALL_MODELS[base], **kwargs)
    if not timm.is_model(base):
        raise UserError(f"unknown model {name!r}: not a timm model nor one of {', '.join(SMALL_MODELS)}")
    try:
        vit = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError:
        if not meta:
            raise
        del kwargs["weight_init"]  # not a VisionTransformer: built as it is, to be refused by its class below
        vit = timm.create_model(name, pretrained=pretrained, **kwargs)
    if not isinstance(vit, VisionTransformer):
        raise UserError(f"model {name!r} is a {type(vit).__name__}, not a timm VisionTransformer")
    return vit


def shipped_weights(name: str) -> Path:
    """The shipped weights file of CPU model ``name``, checked against its record's SHA-256."""
    path, record_path = SHIPPED_WEIGHTS / f"{name}.safetensors", SHIPPED_WEIGHTS / f"{name}.json"
    if not path.is_file() or not record_path.is_file():
        raise UserError(f"{name} has no shipped pretrained weights; pass --no-pretrained, or make them with "
                        f"python -m sfprompt_mpi.pretrain --model {name} --out DIR and pass --checkpoint DIR/{name}.safetensors")
    want = json.loads(record_path.read_text()).get("sha256")
    if hashlib.sha256(path.read_bytes()).hexdigest() != want:
        raise UserError(f"shipped weights {path} do not match the SHA-256 in {record_path.name}; reinstall the package")
    return path


def load_backbone_weights(vit: VisionTransformer, path: str | Path) -> None:
    """Load a local state dict into ``vit``, keeping the new classifier.

    Accepts timm/PyTorch pickles (optionally wrapped in ``state_dict``/``model``)
    and safetensors. Classifier weights of a different shape are dropped; any
    other missing or mismatching key is an error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                    state = state[key]
    except Exception as exc:
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}); is it a weights file?") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} is not a state dict of tensors")
    own = vit.state_dict()
    for key in [k for k in state if k.startswith("head.")]:
        if key not in own or own[key].shape != state[key].shape:
            del state[key]
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise UserError(f"checkpoint {path} does not fit the model: {bad[0]} has shape "
                        f"{tuple(state[bad[0]].shape)}, the model wants {tuple(own[bad[0]].shape)}")
    missing = [k for k in own if k not in state and not k.startswith("head.")]
    if missing:
        raise UserError(f"checkpoint {path} lacks {len(missing)} model tensors (first: {missing[0]}); wrong model?")
    vit.load_state_dict(state, strict=False)
