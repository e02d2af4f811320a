"""Loading a network's weights from a checkpoint file, safely and with clear errors.

Every file is read with ``torch.load(path, map_location="cpu", weights_only=True)``: only tensors
and plain containers are unpickled, so a checkpoint from an untrusted source cannot run code.
Files that carry other pickled objects are refused with :class:`UnsafeCheckpointError`.

    from lightning_backdoor.checkpoints import load_net_weights
    load_net_weights(net, "checkpoints/quickstart/last.ckpt")   # a Lightning checkpoint ("net." keys)
    load_net_weights(net, "resnet20_mnist.pt")                  # or torch.save(net.state_dict(), ...)

Accepted contents: a Lightning checkpoint (``{"state_dict": {"net.conv1.weight": ..., ...}, ...}``;
only the keys under ``prefix`` are used, everything else — optimiser, loops, callbacks — is
ignored), a LightningModule's ``state_dict()`` (``net.`` keys), or the network's own
``state_dict()`` (also with the ``module.`` prefix that DataParallel/DDP adds).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

PathLike = Union[str, "os.PathLike[str]"]

_MAX_LISTED = 20
_REASON = re.compile(r"(Trying to load unsupported GLOBAL[^\n]*|Unsupported[^\n]*)")


class UnsafeCheckpointError(ValueError):
    """A checkpoint that ``torch.load(..., weights_only=True)`` refused to unpickle."""


def safe_load(path: PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder.
        UnsafeCheckpointError: the file holds objects ``weights_only`` loading does not allow
            (arbitrary pickled Python objects), or is not a pickle/torch file at all.
        ValueError: the file is not a readable torch checkpoint (e.g. truncated).
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint file not found: '{p}' (absolute: '{p.absolute()}')")
    if p.is_dir():
        raise IsADirectoryError(f"checkpoint path '{p}' is a folder; expected a file such as '{p / 'last.ckpt'}'")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        match = _REASON.search(str(e))
        reason = match.group(1).strip() if match else str(e).strip().splitlines()[-1]
        raise UnsafeCheckpointError(
            f"checkpoint '{p}' was refused by weights_only loading (torch.load(..., weights_only=True)): "
            f"it holds pickled objects other than tensors and plain containers, or is not a torch file "
            f"({reason}). Unpickling arbitrary objects can execute code, so it is not done here; if you "
            "trust the file, re-save only the weights: torch.save(net.state_dict(), 'weights.pt')"
        ) from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"could not read checkpoint '{p}' as a torch file: {e}") from e


def extract_state_dict(
    obj: Any, model_keys: List[str], prefix: str = "net.", source: str = "checkpoint"
) -> Dict[str, Tensor]:
    """The network's ``state_dict`` inside a loaded checkpoint object (see the module docstring).

    ``model_keys`` (the network's own ``state_dict`` keys) decide whether ``prefix`` / ``module.``
    are stripped: keys are used as they are when they already match the network.
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        found = type(obj).__name__ + (f" with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else "")
        raise ValueError(f"{source} holds no state_dict: expected a Lightning checkpoint (with 'state_dict') or a "
                         f"mapping of parameter names to tensors, got a {found}")
    state = dict(obj)
    wanted = set(model_keys)
    if not set(state) & wanted:  # not the network's own names: strip a known prefix
        for p in (prefix, "module.", "module." + prefix):
            if p and any(k.startswith(p) for k in state):
                stripped = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
                if set(stripped) & wanted or p == prefix:
                    state = stripped
                    break
    bad = [k for k, v in state.items() if not isinstance(v, Tensor) and not k.endswith("_extra_state")]
    if bad:
        raise ValueError(f"{source}: entries {bad[:10]} are not tensors; expected a state_dict of the network")
    return state


def _listed(items: List[str]) -> str:
    head = ", ".join(items[:_MAX_LISTED])
    return head + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def state_dict_mismatches(net: nn.Module, state: Mapping[str, Tensor]) -> Tuple[List[str], List[str], List[str]]:
    """``(missing, unexpected, shape_mismatches)`` of ``state`` against ``net``.

    BatchNorm's ``num_batches_tracked`` may be missing (the model keeps its own counter). Shape
    mismatches read ``"fc.weight: checkpoint [10, 64] vs model [43, 64]"``.
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in own.items()
        if isinstance(v, Tensor) and isinstance(state.get(k), Tensor) and tuple(state[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, shapes


def load_net_weights(net: nn.Module, path: PathLike, prefix: str = "net.") -> nn.Module:
    """Copy the weights stored at ``path`` into ``net`` (in place, on ``net``'s device) and return ``net``.

    Only the network's parameters and buffers are read; optimiser, scheduler and loop states in a
    Lightning checkpoint are ignored. The match is strict: every key and shape must agree.

    Args:
        net: the network to fill.
        path: a Lightning ``.ckpt`` or a file written by ``torch.save(net.state_dict(), path)``.
        prefix: the attribute under which the LightningModule holds the network (``net.``).

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: the file was refused by ``weights_only`` loading.
        ValueError: the file holds no state_dict, or its keys/shapes do not match ``net`` (the
            message lists missing keys, unexpected keys and shape mismatches).

    Example:
        >>> import tempfile, torch
        >>> net = torch.nn.Linear(2, 3)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.save(torch.nn.Linear(2, 3).state_dict(), f"{d}/w.pt")
        ...     _ = load_net_weights(net, f"{d}/w.pt")
    """
    source = f"checkpoint '{os.fspath(path)}'"
    obj = safe_load(path)
    state = extract_state_dict(obj, list(net.state_dict()), prefix=prefix, source=source)
    missing, unexpected, shapes = state_dict_mismatches(net, state)
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the model ({type(net).__name__}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}, in the model but not in the checkpoint): {_listed(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}, in the checkpoint but not in the model): {_listed(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {_listed(shapes)}")
        lines.append("  check that the config's network (class, num_classes, in_channels, width, depth) is the one "
                     "that wrote the checkpoint")
        raise ValueError("\n".join(lines))
    with torch.no_grad():
        net.load_state_dict(state, strict=False)  # strict checks done above; tolerates num_batches_tracked
    return net
