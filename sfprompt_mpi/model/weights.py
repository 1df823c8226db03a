"""Whether timm's pretrained weights can be had, answered in seconds before anything waits on a download.

On a compute node without internet, timm's download retries for minutes
before it fails. Rank 0 asks here first (also for ``--dry-run``): weights in
the Hugging Face cache, or a hub that answers a TCP connection within
``timeout`` seconds; otherwise one UserError line. The other ranks never go
to the network (``run.py`` sets ``HF_HUB_OFFLINE`` for them): they read
what rank 0 fetched into the cache.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from ..errors import UserError

#: The file names timm asks the hub for, in its order.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def check_pretrained_available(name: str, timeout: float = 5.0) -> str:
    """"cached", "reachable" or "unknown" (weights not on the hub: timm's own error will say); else UserError."""
    from timm.models import get_pretrained_cfg
    try:
        pcfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name is build_backbone's to refuse
        return "unknown"
    repo = getattr(pcfg, "hf_hub_id", None) if pcfg is not None else None
    if not repo:
        return "unknown"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in _HUB_FILES):
        return "cached"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or endpoint
    why = "HF_HUB_OFFLINE is set" if HF_HUB_OFFLINE else _unreachable(host, timeout)
    if why is None:
        return "reachable"
    raise UserError(f"pretrained weights for {name} are neither cached (in {HF_HUB_CACHE}) nor reachable "
                    f"({host}: {why}); fetch them where there is internet (jobs/README.md, 'Data and weights on "
                    f"offline compute nodes'), or pass --checkpoint FILE")


def _unreachable(host: str, timeout: float) -> str | None:
    """Why ``host``:443 cannot be reached within ``timeout`` seconds, or None."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return None
    except OSError as exc:
        return f"{exc.strerror or type(exc).__name__} within {timeout:g} s"
