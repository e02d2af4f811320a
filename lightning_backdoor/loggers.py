"""``BackdoorWandbLogger``: a Weights & Biases logger that never blocks training.

W&B in online mode without credentials or without a reachable server can hang for minutes in
``wandb.init``. This logger decides *before* the run starts, in a few seconds at most:

- ``offline=True`` (the default, as in every config of this project): an offline run folder under
  ``save_dir/wandb/`` (upload later with ``wandb sync``); nothing is sent.
- ``offline=False``: the server (``WANDB_BASE_URL``, default ``https://api.wandb.ai``) is probed
  with one TCP connection bounded by ``probe_timeout`` seconds, and an API key is looked for
  (``WANDB_API_KEY`` or a ``~/.netrc`` / ``$NETRC`` entry for the server's host). If either is
  missing, ``on_unreachable="offline"`` (default) warns with the reason and logs offline instead;
  ``on_unreachable="raise"`` raises :class:`WandbUnavailableError`. ``wandb.init`` itself is
  bounded by ``init_timeout``; if it still fails, the same choice applies.
- ``WANDB_MODE=offline`` / ``disabled`` in the environment is respected as is, without a probe.

Example (YAML)::

    logger:
      class_path: lightning_backdoor.loggers.BackdoorWandbLogger
      init_args: {project: lightning-backdoor, name: my-run, save_dir: ., offline: true}
"""

from __future__ import annotations

import netrc
import os
import socket
import threading
from pathlib import Path
from typing import Any, Optional, Tuple
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_warn

DEFAULT_BASE_URL = "https://api.wandb.ai"
ON_UNREACHABLE = ("offline", "raise")


class WandbUnavailableError(RuntimeError):
    """Online W&B logging was requested but the server or the credentials are not available."""


def wandb_base_url() -> str:
    """The W&B server this process would talk to (``WANDB_BASE_URL`` or the public service)."""
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def _host_port(url: str) -> Tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if not parts.hostname:
        raise ValueError(f"cannot read a host from the W&B server address {url!r}")
    return parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)


def server_reachable(url: Optional[str] = None, timeout: float = 3.0) -> Tuple[bool, str]:
    """``(ok, reason)``: whether one TCP connection to the W&B server succeeds within ``timeout`` s.

    Name resolution is bounded too (the probe runs in a daemon thread joined with ``timeout``).
    """
    url = url or wandb_base_url()
    try:
        host, port = _host_port(url)
    except ValueError as e:
        return False, str(e)
    result: list = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as e:
            result.append(e)

    thread = threading.Thread(target=probe, daemon=True, name="wandb-probe")
    thread.start()
    thread.join(timeout + 0.5)
    if not result:
        return False, f"no answer from the W&B server {url} within {timeout:g} s"
    if result[0] is not None:
        return False, f"cannot connect to the W&B server {url} ({type(result[0]).__name__}: {result[0]})"
    return True, ""


def api_key_available(url: Optional[str] = None) -> Tuple[bool, str]:
    """``(ok, reason)``: whether a W&B API key is configured (``WANDB_API_KEY`` or a netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True, ""
    url = url or wandb_base_url()
    try:
        host, _ = _host_port(url)
    except ValueError as e:
        return False, str(e)
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if path.is_file() else None
    except (netrc.NetrcParseError, OSError):
        entry = None
    if entry and entry[2]:
        return True, ""
    return False, f"no W&B API key: WANDB_API_KEY is not set and {path} has no entry for {host} (run `wandb login`)"


class BackdoorWandbLogger(WandbLogger):
    """``WandbLogger`` that is offline by default and falls back to offline (or fails fast) when online
    logging cannot work, instead of hanging. See the module docstring.

    Args:
        offline: log to an offline run folder (default True).
        on_unreachable: ``"offline"`` (warn and log offline) or ``"raise"`` (raise
            :class:`WandbUnavailableError`) when the server cannot be reached, no API key is
            configured, or ``wandb.init`` fails.
        probe_timeout: seconds allowed for the TCP probe of the server.
        init_timeout: seconds ``wandb.init`` may take (``wandb.Settings(init_timeout=...)``).
        *args, **kwargs: as for :class:`lightning.pytorch.loggers.WandbLogger` (``project``, ``name``,
            ``save_dir``, ``log_model``, ... and extra ``wandb.init`` arguments).

    Attributes:
        fallback_reason: why online logging was abandoned (None if it was not).
    """

    def __init__(self, *args: Any, offline: bool = True, on_unreachable: str = "offline",
                 probe_timeout: float = 3.0, init_timeout: float = 30.0, **kwargs: Any) -> None:
        if on_unreachable not in ON_UNREACHABLE:
            raise ValueError(f"on_unreachable must be one of {list(ON_UNREACHABLE)}, got {on_unreachable!r}")
        for name, value in (("probe_timeout", probe_timeout), ("init_timeout", init_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self.on_unreachable = on_unreachable
        self.probe_timeout, self.init_timeout = float(probe_timeout), float(init_timeout)
        self.fallback_reason: Optional[str] = None
        mode = os.environ.get("WANDB_MODE", "").lower()
        if not offline and mode not in ("offline", "dryrun", "disabled"):
            reason = self._check_online()
            if reason is not None:
                offline = True
                if kwargs.get("log_model"):
                    kwargs["log_model"] = False  # checkpoints cannot be uploaded offline
        kwargs["settings"] = self._with_init_timeout(kwargs.get("settings"))
        # W&B's writer is a service process shared by every run of this Python process: a relative
        # save_dir would be resolved against the service's working directory, not the current one.
        for key in ("save_dir", "dir"):
            if kwargs.get(key):
                kwargs[key] = os.path.abspath(os.fspath(kwargs[key]))
        super().__init__(*args, offline=offline, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # Lightning always passes anonymous=None; current wandb warns that the setting has no effect
            self._wandb_init.pop("anonymous", None)

    def _with_init_timeout(self, settings: Any) -> Any:
        import wandb

        if settings is None:
            return wandb.Settings(init_timeout=self.init_timeout)
        if isinstance(settings, dict):
            return {"init_timeout": self.init_timeout, **settings}
        return settings

    def _check_online(self) -> Optional[str]:
        url = wandb_base_url()
        ok, reason = api_key_available(url)
        if ok:
            ok, reason = server_reachable(url, self.probe_timeout)
        if ok:
            return None
        self._give_up(reason)
        return reason

    def _give_up(self, reason: str) -> None:
        if self.on_unreachable == "raise":
            raise WandbUnavailableError(
                f"W&B online logging is not possible: {reason}. Log offline (offline: true, the default; upload "
                "later with `wandb sync`), set WANDB_MODE=offline, or fix the connection/credentials")
        self.fallback_reason = reason
        rank_zero_warn(f"W&B online logging is not possible ({reason}); logging OFFLINE instead. Upload the run "
                       "later with `wandb sync <run folder>`.")

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        try:
            return WandbLogger.experiment.fget.__wrapped__(self)  # type: ignore[attr-defined]
        except Exception as e:  # wandb.init timed out or was refused
            if self._offline or self._experiment is not None:
                raise
            self._give_up(f"wandb.init failed: {type(e).__name__}: {e}")
            self._offline = True
            self._log_model = False
            return WandbLogger.experiment.fget.__wrapped__(self)  # type: ignore[attr-defined]
