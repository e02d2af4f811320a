"""Detection throughput with 1 vs 2 processes on CPU, and the fraction of ideal linear scaling.

    python benchmarks/bench_ddp_detection.py [--samples 512] [--repeats 3] [--width 16]

What is timed is the detection callback's scoring work split as under DDP: each rank takes its
interleaved share of the samples (``callbacks._evaluation.shard``, no padding) and scores it with
SCALE-UP (data-limited), IBD-PSC and STRIP, all fitted on the same held-apart benign samples on every
rank. Processes are forked and joined in a gloo process group on 127.0.0.1; every process uses one
thread. A run's time is the slowest rank's (all-reduce MAX), best of ``--repeats`` after a warm-up.
Throughput = evaluated images (benign + poisoned) per second, all three detectors included.
Ideal linear scaling: 2 processes reach twice the 1-process throughput; on a 2-core machine shared
with other jobs the fraction is bounded by the idle cores.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_backdoor.attacks import BadNets
from lightning_backdoor.callbacks._evaluation import iter_batches, sample_ids, shard
from lightning_backdoor.data import BackdoorDataModule
from lightning_backdoor.detectors import IBDPSC, ScaleUp, Strip
from lightning_backdoor.models import create_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: "mp.Queue") -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=10, in_channels=1, width=args.width).eval()
    dm = BackdoorDataModule("mnist5k", attack=BadNets(), target=0, test_size=args.samples, val_size=100,
                            defense_size=100, eval_batch_size=args.batch_size)
    dm.setup()
    fit = dm.defense_dataloader()
    detectors = [ScaleUp(mode="data_limited").fit(net, fit), IBDPSC(k=1).fit(net, fit), Strip(n=8).fit(net, fit)]
    benign, poisoned = dm.eval_dataloaders("test")

    def score_share() -> int:
        n = 0
        for set_id, loader in enumerate((benign, poisoned)):
            sub, positions = shard(loader, rank, world, None)
            for x, _, pos in iter_batches(sub, positions, torch.device("cpu")):
                for det in detectors:
                    if det.accepts_sample_ids:
                        det.score(net, x, sample_ids=sample_ids(set_id, pos))
                    else:
                        det.score(net, x)
                n += len(x)
        return n

    best = float("inf")
    images = 0
    for i in range(args.repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        local = score_share()
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        count = torch.tensor([local])
        dist.all_reduce(count)
        if i > 0:  # the first pass is a warm-up (fx tracing, allocator)
            best = min(best, float(elapsed))
        images = int(count)
    if rank == 0:
        out.put((images, best))
    dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> tuple[int, float]:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    result = out.get(timeout=1800)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a benchmark process exited with code {p.exitcode}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="test-set size (benign; poisoned = non-target share)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="ResNet-20 width")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"detection throughput (SCALE-UP + IBD-PSC + STRIP, ResNet-20 width {args.width}, MNIST 28x28, "
          f"{args.samples} test images + their poisoned copies; 1 thread per process; {os.cpu_count()} cores)")
    rows = []
    for world in (1, 2):
        images, seconds = measure(world, args)
        rows.append((world, images, seconds, images / seconds))
    base = rows[0][3]
    print(f"{'processes':>9} {'images':>7} {'seconds':>8} {'images/s':>9} {'speed-up':>9} {'of ideal':>9}")
    for world, images, seconds, thr in rows:
        print(f"{world:>9} {images:>7} {seconds:>8.2f} {thr:>9.1f} {thr / base:>8.2f}x {thr / base / world:>8.0%}")


if __name__ == "__main__":
    main()
