"""W&B never blocks training: offline by default; online without a key or a server falls back (or fails fast).

Every test points W&B at loopback (a closed port, or a socket this test opens): nothing leaves the machine.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_backdoor.loggers import (
    BackdoorWandbLogger,
    WandbUnavailableError,
    api_key_available,
    server_reachable,
)

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connections are refused


@pytest.fixture
def online_env(monkeypatch, tmp_path):
    """Online mode with no credentials anywhere and the server on a closed loopback port."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    return monkeypatch


def test_probe_of_a_closed_port_fails_fast_and_an_open_one_succeeds():
    t0 = time.perf_counter()
    ok, reason = server_reachable(f"http://127.0.0.1:{closed_port()}", timeout=3)
    assert not ok and "cannot connect" in reason and time.perf_counter() - t0 < 3.5
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert server_reachable(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=3) == (True, "")


def test_api_key_from_env_or_netrc(online_env, tmp_path):
    ok, reason = api_key_available()
    assert not ok and "WANDB_API_KEY" in reason and "wandb login" in reason
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    online_env.setenv("NETRC", str(netrc))
    assert api_key_available()[0]
    online_env.setenv("NETRC", str(tmp_path / "no-netrc"))
    online_env.setenv("WANDB_API_KEY", FAKE_KEY)
    assert api_key_available()[0]


def test_online_without_key_falls_back_to_offline(online_env):
    with socket.socket() as server:  # a reachable "server", so only the key is missing
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        online_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        with pytest.warns(UserWarning, match="no W&B API key.*logging OFFLINE"):
            logger = BackdoorWandbLogger(project="p", offline=False)
    assert logger._offline and "API key" in logger.fallback_reason


def test_online_with_unreachable_server_raises_when_asked(online_env):
    online_env.setenv("WANDB_API_KEY", FAKE_KEY)
    t0 = time.perf_counter()
    with pytest.raises(WandbUnavailableError, match="cannot connect to the W&B server http://127.0.0.1"):
        BackdoorWandbLogger(project="p", offline=False, on_unreachable="raise", probe_timeout=2)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("kwargs, match", [
    ({"on_unreachable": "wait"}, "on_unreachable"),
    ({"probe_timeout": 0}, "probe_timeout"),
    ({"init_timeout": -1}, "init_timeout"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BackdoorWandbLogger(**kwargs)


def test_plot_failures_are_warnings(monkeypatch):
    from lightning_backdoor.callbacks import DetectionCallback
    from lightning_backdoor.detectors import ScaleUp
    from lightning_backdoor.metrics.detection import DetectionMetrics

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = BackdoorWandbLogger(project="p", offline=False)

    def broken(*args, **kwargs):
        raise ConnectionError("upload failed")

    monkeypatch.setattr(logger, "log_image", broken)
    metric = DetectionMetrics(0.5)
    metric.update(torch.tensor([0.1, 0.9, 0.4, 0.7]), torch.tensor([0, 1, 0, 1]))
    trainer = SimpleNamespace(loggers=[logger], global_rank=0, global_step=0)
    cb = DetectionCallback([ScaleUp()])
    with pytest.warns(UserWarning, match="could not log plots.*upload failed"):
        cb._plot(trainer, "test", cb.detectors[0], metric)


def test_online_cli_run_with_fake_key_and_closed_port_finishes_offline(tmp_path):
    """The quickstart config asked to go online, with a fake key and no server: it falls back within seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}", WANDB_SILENT="true",
               WANDB_DISABLE_GIT="true", HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lightning_backdoor.cli", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
           "--trainer.logger.init_args.offline", "false", "--test_after_fit", "false",
           "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
           "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.num_sanity_val_steps", "0",
           "--data.init_args.batch_size", "16", "--data.init_args.eval_batch_size", "16",
           "--model.init_args.net.init_args.width", "4", "--model.init_args.noise_sigmas", "[]"]
    # the wait for W&B is bounded by the logger's probe timeout (tested directly above); the whole run's
    # wall time depends on the machine's load, so it is not asserted here (no timed unit tests)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logging OFFLINE" in proc.stderr and "cannot connect to the W&B server" in proc.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*")), "the run should have been written offline"
