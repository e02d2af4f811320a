"""``lightning-backdoor sra``: write an SRA backdoor into a trained, clean checkpoint.

    lightning-backdoor fit  --config configs/sra_mnist5k.yaml --data.init_args.attack null   # the clean model
    lightning-backdoor sra  --config configs/sra_mnist5k.yaml --ckpt_path checkpoints/sra_mnist5k/last.ckpt \\
                            --out checkpoints/sra_mnist5k/sra.ckpt [--sra.width 1 --sra.steps 300 ...]
    lightning-backdoor test --config configs/sra_mnist5k.yaml --ckpt_path checkpoints/sra_mnist5k/sra.ckpt

The config is an ordinary fit/test config: its ``model`` must be a ``BackdoorClassifier`` whose net
SRA supports, and its ``data.attack`` is the trigger (unless ``--sra.trigger`` is given). SRA trains its
subnet on clean training images of the data module (never poisoned), edits the network, reports BA
before/after and ASR on the test set, and writes ``--out``: the input checkpoint with the edited
weights, the data module state of this config (so ``test --ckpt_path`` and
``BackdoorDataModule.from_checkpoint`` rebuild the poisoned test set) and an ``sra`` record (settings,
BA/ASR). Loadable with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from .attacks.base import Attack
from .attacks.model_edit import evaluate_ba_asr
from .attacks.sra import SRA
from .checkpoints import safe_load
from .cli import BackdoorCLI, _RawHelp, check_checkpoint_matches


class SRACLI(BackdoorCLI):
    """The fit/test config parser plus ``--sra.*``, ``--ckpt_path`` and ``--out`` (no subcommands)."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(SRA, "sra")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="the trained clean checkpoint (a BackdoorClassifier checkpoint)")
        parser.add_argument("--out", type=Optional[str], default=None, help="where to write the backdoored checkpoint")


def _stack(dataset: Any) -> tuple:
    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        xs.append(item[0])
        ys.append(int(item[1]))
    return torch.stack(xs), torch.tensor(ys)


def sra_main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run ``lightning-backdoor sra`` on ``argv`` (without the ``sra`` word); returns the written report."""
    argv = list(sys.argv[2:] if argv is None else argv)
    cli = SRACLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 run=False, args=argv + ["--trainer.logger", "false"], auto_configure_optimizers=False,
                 save_config_callback=None,
                 parser_kwargs={"prog": "lightning-backdoor sra", "description": __doc__, "formatter_class": _RawHelp})
    cfg = cli.config
    ckpt_path, out = cfg.get("ckpt_path"), cfg.get("out")
    if not ckpt_path or not os.path.isfile(str(ckpt_path)):
        raise SystemExit(f"lightning-backdoor sra: --ckpt_path must name a trained clean checkpoint, got {ckpt_path!r}")
    if not out:
        raise SystemExit("lightning-backdoor sra: --out <path of the backdoored checkpoint to write> is required")
    sra: SRA = cli.config_init["sra"]
    model, dm = cli.model, cli.datamodule
    net = getattr(model, "net", None)
    if net is None:
        raise SystemExit(f"lightning-backdoor sra: the model must be a BackdoorClassifier (with .net), got "
                         f"{type(model).__name__}")
    check_checkpoint_matches(model, str(ckpt_path))
    ckpt = safe_load(str(ckpt_path))
    model.load_state_dict(ckpt["state_dict"])
    dm.setup("test")
    trigger = sra.trigger if sra.trigger is not None else getattr(dm, "attack", None)
    if not isinstance(trigger, Attack):
        raise SystemExit("lightning-backdoor sra: no trigger: give the config's data.init_args.attack (a dataset-level "
                         "attack such as BadNets) or --sra.trigger")
    target = int(dm.target)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device)
    trigger = trigger.to(device)
    x_test, y_test = _stack(dm.test_clean)
    before = evaluate_ba_asr(net, x_test, y_test, trigger, target)
    base = getattr(dm.train_set, "dataset", dm.train_set)  # the clean training images (never poisoned)
    edited = sra.edit(net, base, target, trigger=trigger)
    after = evaluate_ba_asr(edited, x_test, y_test, trigger, target)
    model.net = edited.cpu()
    report = {"ba_before": before["ba"], "asr_before": before["asr"], "ba_after": after["ba"], "asr": after["asr"],
              "ckpt_path": str(ckpt_path), **sra.report}
    written = dict(ckpt)
    written["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    written[type(dm).__qualname__] = dm.state_dict()
    written["datamodule_hyper_parameters"] = {k: v for k, v in dict(getattr(dm, "hparams", {})).items()}
    written["sra"] = report
    os.makedirs(os.path.dirname(os.path.abspath(str(out))), exist_ok=True)
    torch.save(written, str(out))
    print("\n| | BA | ASR |\n|---|---|---|")
    print(f"| clean model | {before['ba']:.4f} | {before['asr']:.4f} |")
    print(f"| after SRA (width {sra.width}) | {after['ba']:.4f} | {after['asr']:.4f} |")
    print(f"\nwrote {out}; evaluate it with: lightning-backdoor test --config <this config> --ckpt_path {out}")
    return report
