"""Render one picture per registered attack on the embedded MNIST digits: docs/img/attacks/<name>.png.

    python scripts/attack_gallery.py [--out docs/img/attacks] [--attacks badnets,batt] [--images 6]

Each picture has the rows of :func:`lightning_backdoor.attacks.preview.trigger_rows`: clean digits,
the test-time poisoned digits, the training-time poisoned digits where the attack's two triggers
differ (PhysicalBA, Adap-*), the clean-image transform where there is one (BATT), and the absolute
difference (test-time poisoned - clean, scaled so that the largest difference is white). The
digits are one seeded random digit of each of the classes 1..N (never "the first N" of the
label-sorted set). Every attack in the registry is drawn with its default settings and seed 0, so
attacks added later appear without touching this script. Attacks with ``requires_fit=True`` are
fitted first on a seeded 2,000-digit subset with a small surrogate (a width-8 ResNet-20 trained for
one epoch, seeded) through ``fit(dataset, target, model=surrogate)``; when that fails the attack is
skipped with a printed note. Batch-level / trainable attacks (``trainable=True``) are skipped.
About 20 s on 2 CPU cores without attacks to fit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_backdoor.attacks import ATTACKS, create_attack, list_attacks  # noqa: E402
from lightning_backdoor.attacks.preview import trigger_grid, trigger_rows  # noqa: E402
from lightning_backdoor.data import load_mnist5k  # noqa: E402
from lightning_backdoor.data.datasets import TensorImageDataset  # noqa: E402
from lightning_backdoor.utils import random_subset  # noqa: E402


def digits(n: int, seed: int = 0) -> torch.Tensor:
    """One seeded random digit of each class 1..n, as float ``[n, 1, 28, 28]`` in [0, 1]."""
    images, labels = load_mnist5k()
    picks = []
    for c in range(1, n + 1):
        members = torch.nonzero(labels == c).flatten()
        picks.append(int(members[random_subset(len(members), 1, seed=seed + c)[0]]))
    return images[picks].float() / 255


def surrogate(dataset: TensorImageDataset, seed: int = 0) -> torch.nn.Module:
    """A small seeded surrogate: width-8 ResNet-20 trained for one epoch (batch 64, SGD) on ``dataset``."""
    from lightning_backdoor.models import create_model

    torch.manual_seed(seed)
    net = create_model("resnet20", num_classes=10, in_channels=1, width=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    net.train()
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def fit_data(seed: int = 0) -> TensorImageDataset:
    images, labels = load_mnist5k()
    idx = random_subset(len(images), 2000, seed=seed)
    return TensorImageDataset(images[idx], labels[idx])


def make_attack(name: str, state: dict):
    cls = ATTACKS.get(name)
    if getattr(cls, "trainable", False):
        print(f"  {name}: skipped (trained jointly with the classifier; no data-level trigger to draw)")
        return None
    try:
        attack = create_attack(name, seed=0)
    except TypeError:
        attack = create_attack(name)
    attack.build(1, 28, 28)
    if getattr(attack, "requires_fit", False):
        try:
            if "data" not in state:
                state["data"] = fit_data()
                start = time.perf_counter()
                state["surrogate"] = surrogate(state["data"])
                print(f"  (surrogate trained in {time.perf_counter() - start:.1f} s)")
            start = time.perf_counter()
            attack.fit(state["data"], 0, model=state["surrogate"])
            print(f"  {name}: fitted in {time.perf_counter() - start:.1f} s")
        except Exception as e:  # an attack without a usable fit API yet
            print(f"  {name}: skipped, could not fit it with a surrogate ({type(e).__name__}: {e})")
            return None
    return attack


def render(name: str, rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = trigger_grid(rows)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 40, grid.shape[0] / 40 + 0.4), dpi=100)
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([(28 + 2) * i + 14 for i in range(len(rows))], list(rows), fontsize=8)
    ax.set_xticks([])
    ax.set_title(name, fontsize=9)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "attacks"))
    parser.add_argument("--attacks", default="", help="comma-separated registry names (default: all)")
    parser.add_argument("--images", type=int, default=6, help="digits per row (classes 1..N)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    names = [n for n in args.attacks.split(",") if n] or list_attacks()
    x = digits(args.images)
    state: dict = {}
    written = []
    for name in names:
        attack = make_attack(name, state)
        if attack is None:
            continue
        path = Path(args.out) / f"{name}.png"
        render(name, trigger_rows(attack, x, seed=0), path)
        written.append(path)
        print(f"  {name}: {path}")
    print(f"wrote {len(written)} pictures to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
