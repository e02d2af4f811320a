"""The ``lightning-backdoor`` console script: LightningCLI with ``fit`` / ``validate`` / ``test``.

    lightning-backdoor fit --config configs/quickstart.yaml
    lightning-backdoor test --config configs/detect.yaml --ckpt_path path/to/model.ckpt

Any LightningModule / LightningDataModule can be named with ``class_path``; ours are
:class:`~lightning_backdoor.modules.BackdoorClassifier` and
:class:`~lightning_backdoor.data.BackdoorDataModule`. Extra top-level option: ``--test_after_fit``
(run ``test`` on the trained weights right after ``fit``, as the quickstart does).

Checkpoints (``--ckpt_path path/to.ckpt`` or ``--ckpt_path last`` to resume a fit) are loaded with
``weights_only=True`` unless ``--weights_only false`` is given: a file carrying arbitrary pickled
objects is refused before anything is unpickled (:class:`~lightning_backdoor.checkpoints.UnsafeCheckpointError`),
and a checkpoint of another architecture or class count is refused with the differing keys and
shapes listed.
"""

from __future__ import annotations

import os
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import yaml

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from .checkpoints import safe_load, state_dict_mismatches


def check_checkpoint_matches(model: LightningModule, path: str) -> None:
    """Raise ``ValueError`` listing missing/unexpected keys and shape differences when the checkpoint at
    ``path`` (read with ``weights_only=True``) was written by another architecture or class count."""
    ckpt = safe_load(path)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        return  # not a Lightning checkpoint; Lightning reports it
    missing, unexpected, shapes = state_dict_mismatches(model, state)
    if getattr(model, "batch_attack", False) is None:
        # a batch attack's parts (IAD's generators) join the module in setup, when it adopts the data
        # module's attack, or in on_load_checkpoint; Lightning's strict loading still checks them then
        unexpected = [k for k in unexpected if not k.startswith("batch_attack.")]
    if not (missing or unexpected or shapes):
        return
    lines = [f"checkpoint '{path}' does not match the model {type(model).__name__} of this config:"]
    for title, items in (("missing keys (in the model, not in the checkpoint)", missing),
                         ("unexpected keys (in the checkpoint, not in the model)", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            lines.append(f"  {title}: {', '.join(items[:20])}" + (f", ... and {len(items) - 20} more" if len(items) > 20 else ""))
    lines.append("  use the network settings (class, num_classes, in_channels, width, depth) the checkpoint was trained with")
    raise ValueError("\n".join(lines))


REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_SPECIAL_CKPT = ("last", "best", "hpc", "registry")


def config_summaries(root: Path = REPO_CONFIGS) -> List[Tuple[str, str]]:
    """``(relative path, first header line)`` of every YAML config under ``root`` (sweep files excluded)."""
    out = []
    if root.is_dir():
        for path in sorted(root.rglob("*.yaml")):
            if path.name.startswith("sweep_"):
                continue
            header = []
            for ln in path.read_text().splitlines():
                if not ln.startswith("#"):
                    break
                header.append(ln.lstrip("# ").strip())
            text = " ".join(header)
            cut = text.find(". ")
            out.append((str(path.relative_to(root.parent)), text[:cut] if cut > 0 else text))
    return out


def _description() -> str:
    lines = ["lightning_backdoor: backdoor attacks and backdoor detectors for PyTorch Lightning, logged to W&B.",
             "", "  lightning-backdoor fit --config configs/quickstart.yaml",
             "  lightning-backdoor test --config configs/detect.yaml --ckpt_path checkpoints/quickstart/last.ckpt",
             "  lightning-backdoor matrix --config configs/matrix/mnist5k.yaml   (attack x defence grid; matrix --help)",
             "  lightning-backdoor sra --config configs/sra_mnist5k.yaml --ckpt_path clean.ckpt --out sra.ckpt   "
             "(SRA weight edit; sra --help)"]
    summaries = config_summaries()
    if summaries:
        lines += ["", "Configs shipped with the project:"]
        lines += [f"  {path}: {text if len(text) <= 110 else text[:107] + '...'}" for path, text in summaries]
    return "\n".join(lines)


def checkpoint_producer(path: str, search: Sequence[Path] = ()) -> Optional[Path]:
    """The config whose ``ModelCheckpoint(dirpath=..., save_last=True)`` writes ``path``, if one of ``search`` holds it."""
    want = Path(path).as_posix().lstrip("./")
    for root in list(search) + [REPO_CONFIGS]:
        if not root.is_dir():
            continue
        for cfg_path in sorted(root.rglob("*.yaml")):
            try:
                cfg = yaml.safe_load(cfg_path.read_text()) or {}
            except yaml.YAMLError:
                continue
            cbs = ((cfg.get("trainer") or {}).get("callbacks") or []) if isinstance(cfg, dict) else []
            for cb in cbs if isinstance(cbs, list) else []:
                args = (cb or {}).get("init_args") or {}
                if str(cb.get("class_path", "")).endswith("ModelCheckpoint") and args.get("dirpath") and args.get("save_last"):
                    if (Path(str(args["dirpath"])) / "last.ckpt").as_posix().lstrip("./") == want:
                        return cfg_path
    return None


def _relative(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


class BackdoorCLI(LightningCLI):
    """LightningCLI with ``--test_after_fit``, safe checkpoint loading and a pointer to the W&B run folder.

    Refuses, in one line and before anything starts: ``validate``/``test`` without ``--ckpt_path`` (or
    ``init_weights``) — the weights would be untrained — unless ``--allow_untrained true``; and a
    missing ``--ckpt_path`` / ``init_weights`` file, naming the config that writes it when one of the
    project's configs does.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, run test on the final weights (fit subcommand only)")
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="validate/test: evaluate the model's initial (untrained) weights on purpose; without "
                                 "it, validate/test need --ckpt_path or the model's init_weights")

    def parse_arguments(self, parser, args) -> None:
        # Explicit args (run_cli, e.g. a matrix cell inside `lightning-backdoor matrix --config ...`) replace the
        # process's command line: hide sys.argv while parsing only, so Lightning does not warn once per cell that
        # both were given (sys.argv is left as it is for the run itself).
        if args is None:
            return super().parse_arguments(parser, args)
        saved, sys.argv = sys.argv, sys.argv[:1]
        try:
            return super().parse_arguments(parser, args)
        finally:
            sys.argv = saved

    # -- refuse meaningless runs before anything starts ------------------------------------------
    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        model = cfg.get("model")
        init_args = model.get("init_args") if model is not None and hasattr(model, "get") else None
        init_weights = init_args.get("init_weights") if init_args is not None and hasattr(init_args, "get") else None
        ckpt = cfg.get("ckpt_path")
        config_dirs = [Path(str(c)).resolve().parent for c in (cfg.get("config") or [])]
        for what, path in (("--ckpt_path", ckpt), ("--model.init_args.init_weights", init_weights)):
            if path and str(path) not in _SPECIAL_CKPT and not Path(str(path)).expanduser().exists():
                raise SystemExit(self._missing(what, str(path), config_dirs))
        if sub in ("validate", "test") and not ckpt and not init_weights and not cfg.get("allow_untrained"):
            raise SystemExit(
                f"lightning-backdoor {sub}: no --ckpt_path, so the model would be evaluated with untrained (randomly "
                "initialised) weights and every number would be meaningless. Pass --ckpt_path path/to/model.ckpt "
                "(e.g. checkpoints/quickstart/last.ckpt, written by `lightning-backdoor fit --config "
                "configs/quickstart.yaml`), or --allow_untrained true to evaluate the initial weights on purpose.")

    @staticmethod
    def _missing(what: str, path: str, config_dirs: Sequence[Path]) -> str:
        searched = []
        for d in config_dirs:  # the configs/ folder the given config lives in
            top = next((p for p in [d, *d.parents] if p.name == "configs"), None)
            searched.append(top or d)
        producer = checkpoint_producer(path, searched)
        first = (f"run `lightning-backdoor fit --config {_relative(producer)}` first (it writes that file; run both "
                 "from the same directory)") if producer is not None else "train the model that writes it first"
        return (f"lightning-backdoor: checkpoint {path!r} ({what}) not found under {os.getcwd()}: {first}, "
                f"or pass {what} <path to a checkpoint>.")

    # -- checkpoints -----------------------------------------------------------------------------
    def _ckpt_file(self, config: Any) -> Optional[str]:
        ckpt = config.get("ckpt_path") if config is not None else None
        return str(ckpt) if ckpt and Path(str(ckpt)).is_file() else None

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here; refuse an unsafe file first, with a clear error
        sub = self.config.get("subcommand")
        if sub:
            path = self._ckpt_file(self.config[sub])
            if path is not None and self.config[sub].get("weights_only") is not False:
                safe_load(path)
        super()._parse_ckpt_path()

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()) and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = True
        path = self._ckpt_file(kwargs)
        if path is not None and kwargs.get("weights_only") is not False:
            check_checkpoint_matches(self.model, path)
        return kwargs

    def after_fit(self) -> None:
        if self.config.get(self.subcommand, {}).get("test_after_fit", False):
            self.trainer.test(self.model, datamodule=self.datamodule)
        self._report_wandb()

    def after_validate(self) -> None:
        self._report_wandb()

    def after_test(self) -> None:
        self._report_wandb()

    @rank_zero_only
    def _report_wandb(self) -> None:
        try:
            self._print_wandb_folders()
        except Exception as e:  # reporting must never fail a finished run
            rank_zero_warn(f"could not report the W&B run folder: {e!r}")

    def _print_wandb_folders(self) -> None:
        for logger in self.trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            run = logger.experiment
            run_dir = Path(getattr(run, "dir", "") or "").parent
            if not str(run_dir) or str(run_dir) == ".":
                continue
            offline = getattr(getattr(run, "settings", None), "mode", "") == "offline" or "offline-run" in run_dir.name
            print(f"\nW&B run folder: {run_dir}")
            if offline:
                print(f"  offline run; upload it later with:  wandb sync {run_dir}")


class _RawHelp(RawDescriptionHelpFormatter):
    """Keeps the description's line breaks in ``--help``."""


def run_cli(args: Optional[List[str]] = None) -> BackdoorCLI:
    """Run the CLI on ``args`` (a ``fit``/``validate``/``test`` command line) and return the ``BackdoorCLI``
    (its ``trainer``, ``model`` and ``datamodule``), for programmatic use such as the attack x defence matrix."""
    with warnings.catch_warnings():
        # A test/validate run does not need the training callbacks (ModelCheckpoint, ...) whose state a fit
        # checkpoint carries; Lightning's "Please add the following callbacks" is meant for resuming a fit.
        argv = sys.argv[1:] if args is None else list(args)
        if argv and argv[0] in ("validate", "test", "predict"):
            warnings.filterwarnings("ignore", message=r".*callbacks used to create the checkpoint need to be provided")
        # the configs write last.ckpt into a fixed folder on purpose (a re-run overwrites it)
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        # Lightning 2.x's own use of a torch pytree API deprecated in torch 2.14: nothing a user can act on
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
        return BackdoorCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "lightning-backdoor", "description": _description(), "formatter_class": _RawHelp},
        )


def main(args: Optional[List[str]] = None) -> None:
    """Entry point of the ``lightning-backdoor`` console script: LightningCLI's subcommands plus ``matrix`` and ``sra``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "matrix":
        from .matrix import matrix_main

        matrix_main(argv[1:])
        return
    if argv and argv[0] == "sra":
        from .sra_cli import sra_main

        sra_main(argv[1:])
        return
    run_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main()
