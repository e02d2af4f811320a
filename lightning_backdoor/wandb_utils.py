"""Reading back what an offline W&B run recorded, without a server.

``read_offline_run(run_dir)`` parses the run's ``run-<id>.wandb`` transaction log (a LevelDB-style
log of W&B protobuf records) and returns its history rows, final summary and config. Useful to
check a run before ``wandb sync`` uploads it, and in tests.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

_BLOCK = 32768
_HEADER_LEN = 7  # ":W&B" + magic 0xBEE1 (LE) + version byte
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log (missing ':W&B' header)")
    pos, pending = _HEADER_LEN, b""
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - (pos % _BLOCK)
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        pos += 7
        chunk = data[pos:pos + length]
        pos += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            pos += (_BLOCK - (pos % _BLOCK)) % _BLOCK  # zero padding up to the next block
        else:
            break


def _items(items) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        try:
            out[key] = json.loads(item.value_json)
        except (ValueError, TypeError):
            out[key] = item.value_json
    return out


def read_offline_run(run_dir: str | Path, wait: float = 0.0) -> Dict[str, Any]:
    """``{"history": [row, ...], "summary": {...}, "config": {...}, "finished": bool}`` of an offline run.

    ``run_dir`` is the ``wandb/offline-run-<date>-<id>`` folder (the one ``wandb sync`` takes).
    W&B's writer process flushes the log asynchronously, even after ``run.finish()`` returns:
    ``wait`` seconds are spent polling until the run's exit record is on disk.
    """
    run_dir = Path(run_dir)
    deadline = time.monotonic() + wait
    logs = sorted(run_dir.glob("run-*.wandb"))
    while not logs and time.monotonic() < deadline:  # the writer may not have created it yet
        time.sleep(0.2)
        logs = sorted(run_dir.glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}; is this a W&B run folder?")
    while True:
        out = _read_log(logs[0])
        if out["finished"] or time.monotonic() >= deadline:
            return out
        time.sleep(0.2)


def _read_log(path: Path) -> Dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb
    history: List[Dict[str, Any]] = []
    summary: Dict[str, Any] = {}
    config: Dict[str, Any] = {}
    finished = False
    for raw in _records(path):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except Exception:  # a truncated last record of a run that is still being written
            continue
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = _items(rec.history.item)
            history.append(row)
            summary.update({k: v for k, v in row.items() if not k.startswith("_")})
        elif kind == "summary":
            summary.update(_items(rec.summary.update))
        elif kind == "config":
            for item in rec.config.update:
                key = item.key or "/".join(item.nested_key)
                try:
                    config[key] = json.loads(item.value_json)
                except (ValueError, TypeError):
                    config[key] = item.value_json
        elif kind == "exit":
            finished = True
        elif kind == "run":
            for item in rec.run.config.update:
                key = item.key or "/".join(item.nested_key)
                config[key] = json.loads(item.value_json)
    return {"history": history, "summary": summary, "config": config, "finished": finished}
