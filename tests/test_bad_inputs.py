"""Every row of docs/bad_inputs.md: the bad input is rejected with the documented error, not a crash inside torch.

Each case is ``(row id, callable, exception type, message pattern)``; the ids are the first column of
the table, and a test checks that the table and this list name the same rows.
"""

import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tiny_net import TinyResNet
from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import BATT, AdaptiveBlend, AdaptivePatch, BadNets, PhysicalBA, WaNet, create_attack
from lightning_backdoor.attacks import IAD, SRA
from lightning_backdoor.callbacks import BackdoorMetrics, DetectionCallback
from lightning_backdoor.checkpoints import UnsafeCheckpointError, load_net_weights, safe_load
from lightning_backdoor.data import CheckpointMismatchError, DatasetNotFoundError, PoisonedDataset
from lightning_backdoor.data.datasets import TensorImageDataset
from lightning_backdoor.data.loaders import ResumableDataLoader
from lightning_backdoor.detectors import IBDPSC, BaDExpert, Frequency, ScaleUp, ShrinkPad, Strip, TeCo, create_detector
from lightning_backdoor.loggers import BackdoorWandbLogger
from lightning_backdoor.losses import create_loss
from lightning_backdoor.metrics import AttackSuccessRate
from lightning_backdoor.metrics.detection import detection_metrics
from lightning_backdoor.models import create_model
from lightning_backdoor.batch import parse_batch
from lightning_backdoor.cli import main
from lightning_backdoor.certified import certify, feasible_set
from lightning_backdoor.sanitizers import Slab, Sphere, create_sanitizer, extract_features
from lightning_backdoor.defenses import NeuralCleanse
from lightning_backdoor.detectors import NeuralCleanseFilter

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
DETECT = QUICKSTART.parent / "detect.yaml"
ADAPTIVE_SCALE_UP = QUICKSTART.parent / "adaptive" / "scale_up.yaml"

x = torch.rand(4, 1, 28, 28)


def nan_images():
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    return bad


def inf_images():
    bad = x.clone()
    bad[1, 0, 3, 3] = float("inf")
    return bad


def uint8_images():
    return (x * 255).to(torch.uint8)


def net():
    torch.manual_seed(0)
    return TinyResNet()


def labelled_dataset(n, labels=None):
    return TensorImageDataset(torch.rand(n, 1, 8, 8), torch.zeros(n, dtype=torch.long) if labels is None else labels)


def fit_with(module, dm):
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, dm)


def dm(**kw):
    args = dict(dataset="mnist5k", attack=BadNets(), val_size=50, defense_size=50, test_size=50)
    args.update(kw)
    return BackdoorDataModule(**args)


def _save(obj, path):
    torch.save(obj, path)
    return path


class _Code:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickling ran code')",))


def evil_file(tmp):
    return _save({"state_dict": {}, "x": _Code()}, tmp / "evil.ckpt")


def ten_class_weights(tmp):
    return _save(TinyResNet(num_classes=10).state_dict(), tmp / "w.pt")


def other_seed_state():
    d = dm()
    d.setup()
    state = d.state_dict()
    return dm(seed=1).load_state_dict, state


def frequency_fitted_on_8x8():
    return Frequency(epochs=1).fit(net(), (torch.rand(8, 1, 8, 8), torch.arange(8) % 10))


def frozen_net():
    return net().requires_grad_(False)
def nan_features():
    bad = torch.rand(6, 3)
    bad[2, 1] = float("nan")
    return bad


def two_blobs():
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(10, 2, generator=g) - 2, torch.randn(10, 2, generator=g) + 2])
    labels = torch.arange(20) // 10
    return feats, labels, feasible_set(feats, labels)


def cli_unknown_key():
    from lightning_backdoor.cli import main

    main(["fit", "--config", str(QUICKSTART), "--data.init_args.poison_rat", "0.1"])


CASES = [
    # attacks
    ("attack-nan-images", lambda t: BadNets()(nan_images()), ValueError, "NaN or Inf"),
    ("attack-inf-images", lambda t: WaNet()(inf_images()), ValueError, "NaN or Inf"),
    ("attack-uint8-images", lambda t: BadNets()(uint8_images()), TypeError, "uint8 images in 0-255\\? divide by 255"),
    ("attack-0-255-floats", lambda t: BadNets()(x * 255), ValueError, "pixel space \\[0, 1\\]"),
    ("attack-not-images", lambda t: BadNets()(torch.rand(28, 28)), ValueError, "must have shape"),
    ("attack-patch-channels", lambda t: BadNets(patch=torch.rand(3, 3, 3))(x), ValueError,
     "patch has 3 channels but the images have 1"),
    ("attack-wanet-grid-too-large", lambda t: WaNet(k=40)(x), ValueError, "k=40 is larger than the image size"),
    ("attack-bad-location", lambda t: BadNets(location="middle"), ValueError, "location must be one of"),
    ("attack-unknown-name", lambda t: create_attack("badnet"), ValueError, "unknown attack 'badnet'.*badnets"),
    # poisoned data
    ("data-zero-length-dataset", lambda t: PoisonedDataset(labelled_dataset(0), BadNets(), 0, 10), ValueError,
     "dataset is empty"),
    ("data-label-out-of-range", lambda t: PoisonedDataset(labelled_dataset(4, torch.tensor([0, 1, 2, 12])), BadNets(),
                                                          0, 10), ValueError, "labels must be in \\[0, 9\\]"),
    ("data-only-target-class", lambda t: PoisonedDataset(labelled_dataset(4), BadNets(), 0, 10, mode="test"),
     ValueError, "no samples whose label is not the target"),
    # data module
    ("datamodule-rate-zero", lambda t: dm(rate=0), ValueError, "rate must be in \\(0, 1\\]"),
    ("datamodule-target-out-of-range", lambda t: dm(target=10), ValueError, "target must be a class index in \\[0, 9\\]"),
    ("datamodule-unknown-dataset", lambda t: dm(dataset="imagenet1k"), ValueError, "unknown dataset 'imagenet1k'"),
    ("datamodule-zero-test-size", lambda t: dm(test_size=0), ValueError, "test_size must be >= 1"),
    ("datamodule-val-size-too-large", lambda t: dm(val_size=5000).setup(), ValueError, "val_size must be in"),
    ("datamodule-missing-files", lambda t: BackdoorDataModule("cifar10", root=str(t / "none"), attack=BadNets()).setup(),
     DatasetNotFoundError, "CIFAR-10 files not found under"),
    ("datamodule-empty-loader", lambda t: dm()._loader(labelled_dataset(0)), ValueError,
     "cannot build a loader over an empty dataset"),
    # models and the LightningModule
    ("model-unknown-name", lambda t: create_model("resnet-18"), ValueError, "resnet18"),
    ("model-wrong-channels", lambda t: create_model("resnet20", num_classes=10, in_channels=1)(torch.rand(2, 3, 28, 28)),
     ValueError, "3 channels but the model was built with in_channels=1"),
    ("classifier-net-not-module", lambda t: BackdoorClassifier("resnet20"), TypeError, "net must be a torch.nn.Module"),
    ("classifier-mismatched-num-classes", lambda t: fit_with(BackdoorClassifier(TinyResNet(num_classes=5)), dm()),
     ValueError, "mismatched num_classes: the net outputs 5 classes but the dataset 'mnist5k' has 10"),
    ("classifier-mismatched-channels", lambda t: fit_with(BackdoorClassifier(TinyResNet(in_channels=3)), dm()),
     ValueError, "mismatched channels: the net expects in_channels=3"),
    ("classifier-bad-noise-sigma", lambda t: BackdoorClassifier(net(), noise_sigmas=[-0.1]), ValueError,
     "noise_sigmas must be > 0"),
    ("classifier-bad-batch", lambda t: parse_batch("images"), TypeError, "expected a Tensor of images, a tuple"),
    # detectors
    ("detector-nan-images", lambda t: ScaleUp().score(net(), nan_images()), ValueError, "NaN or Inf"),
    ("detector-uint8-images", lambda t: IBDPSC(k=1).score(net(), uint8_images()), TypeError, "divide by 255"),
    ("detector-wrong-channels", lambda t: ScaleUp().score(net(), torch.rand(2, 3, 28, 28)), ValueError,
     "3 channels but the model expects in_channels=1"),
    ("detector-not-fitted", lambda t: Strip().score(net(), x), RuntimeError, "must be fitted on benign data"),
    ("detector-empty-fit-loader", lambda t: ScaleUp(mode="data_limited").fit(
        net(), DataLoader(TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)))),
     ValueError, "benign data is empty"),
    ("detector-unlabelled-fit-data", lambda t: Strip().fit(net(), x), TypeError, "labels are needed"),
    ("detector-unknown-name", lambda t: create_detector("scaleup"), ValueError, "unknown detector 'scaleup'"),
    ("detector-bad-scales", lambda t: ScaleUp(scales=[0, 3]), ValueError, "scales"),
    # callbacks
    ("callback-no-detectors", lambda t: DetectionCallback([]), ValueError, "detectors must be a non-empty list"),
    ("callback-detector-name-string", lambda t: DetectionCallback(["scale_up"]), TypeError, "Detector instances"),
    ("callback-bad-stage", lambda t: DetectionCallback([ScaleUp()], stages=("train",)), ValueError,
     "stages must be a subset"),
    # losses
    ("loss-unknown-name", lambda t: create_loss("nope"), ValueError, "unknown loss 'nope'"),
    # metrics
    ("metric-nan-scores", lambda t: detection_metrics(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), 0.5),
     ValueError, "scores contain NaN or Inf"),
    ("metric-float-labels", lambda t: detection_metrics(torch.rand(2), torch.tensor([0.0, 1.0]), 0.5), TypeError,
     "is_poisoned must be a bool or 0/1 integer"),
    ("metric-length-mismatch", lambda t: detection_metrics(torch.rand(3), torch.tensor([0, 1]), 0.5), ValueError,
     "same number of elements"),
    ("metric-asr-without-target", lambda t: AttackSuccessRate().update(torch.rand(2, 10)), ValueError,
     "needs target"),
    # CLI, loggers, loaders
    ("cli-unknown-config-key", lambda t: cli_unknown_key(), SystemExit, ""),
    ("logger-bad-on-unreachable", lambda t: BackdoorWandbLogger(on_unreachable="wait"), ValueError,
     "on_unreachable must be one of"),
    ("loader-bad-resume-state", lambda t: ResumableDataLoader(list(range(4)), batch_size=2).load_state_dict({}),
     ValueError, "must hold 'epoch'"),
    # checkpoints
    ("checkpoint-missing-file", lambda t: safe_load(t / "nope.ckpt"), FileNotFoundError, "checkpoint file not found"),
    ("checkpoint-pickled-code", lambda t: safe_load(evil_file(t)), UnsafeCheckpointError,
     "refused by weights_only loading"),
    ("checkpoint-other-class-count", lambda t: load_net_weights(TinyResNet(num_classes=5), ten_class_weights(t)),
     ValueError, "shape mismatches.*fc.weight: checkpoint \\[10, 32\\] vs model \\[5, 32\\]"),
    ("checkpoint-other-data-settings", lambda t: (lambda f, s: f(s))(*other_seed_state()), CheckpointMismatchError,
     "seed: checkpoint 0 vs this data module 1"),
    # degenerate settings: a method made meaningless must not produce numbers
    ("attack-wanet-zero-strength", lambda t: WaNet(s=0.0), ValueError, "s must be > 0"),
    ("attack-badnets-zero-mask", lambda t: BadNets(patch_size=3, mask=torch.zeros(3, 3)), ValueError,
     "mask is all zeros"),
    ("data-rate-above-candidates", lambda t: PoisonedDataset(labelled_dataset(10, torch.arange(10) % 2), BadNets(), 0,
                                                             10, rate=0.9), ValueError, "the largest rate is 0.5"),
    ("data-options-without-attack", lambda t: BackdoorDataModule("mnist5k", rate=0.2), UserWarning,
     "ignored: attack=None trains a clean model"),
    ("detector-scale-up-shrinking-scales", lambda t: ScaleUp(scales=(0.5, 3)), ValueError,
     "finite numbers > 1.*n < 1 darkens"),
    ("detector-ibd-psc-shrinking-omega", lambda t: IBDPSC(omega=0.8), ValueError, "omega must be > 1.*shrinks"),
    ("detector-one-output-head", lambda t: ScaleUp().score(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 1)),
                                                           x), ValueError, "at least 2 classes"),
    ("detector-tuple-output", lambda t: ScaleUp().score(TupleNet(), x), TypeError, "returned a tuple.*output_key=0"),
    ("detector-normalised-images", lambda t: ScaleUp().score(net(), (x - 0.1307) / 0.3081), ValueError,
     "a normalised batch"),
    ("detector-ignored-argument", lambda t: IBDPSC(k=2, xi=0.3), UserWarning, "xi=0.3 is ignored"),
    ("detector-strip-pool-smaller-than-n", lambda t: Strip(n=10).fit(net(), (x, torch.arange(4))), UserWarning,
     "pool holds 4 images but n=10"),
    ("loss-alpha-one", lambda t: create_loss("ibd_psc_adaptive", alpha=1.0), ValueError, r"alpha must be in \[0, 1\)"),
    ("loss-zero-weight", lambda t: create_loss("scale_up_adaptive", weight=0.0), ValueError, "weight must be > 0"),
    ("loss-shrinking-omega", lambda t: create_loss("ibd_psc_adaptive", omega=1.0), ValueError, "omega must be > 1"),
    ("loss-ignored-argument", lambda t: create_loss("ibd_psc_adaptive", design=1, zeta=0.5), UserWarning,
     "zeta=0.5 is ignored"),
    ("callback-zero-max-samples", lambda t: BackdoorMetrics(max_samples=0), ValueError,
     "max_samples must be None or an int >= 1"),
    ("callback-no-target", lambda t: detect_without_target(), UserWarning, "successful/\\* are not logged; pass target"),
    ("callback-asr-set-all-target", lambda t: metrics_on_all_target_labels(), UserWarning,
     "asr is undefined and not logged"),
    ("classifier-dict-output", lambda t: fit_with(BackdoorClassifier(DictNet()), dm()), TypeError,
     "returned a dict.*output_key='logits'"),
    ("classifier-normalised-batch", lambda t: BackdoorClassifier(net()).training_step(
        ((x - 0.5) * 4, torch.zeros(4, dtype=torch.long)), 0), ValueError, "pixel space"),
    ("classifier-dtype-mismatch", lambda t: BackdoorClassifier(net().double()).training_step(
        (x, torch.zeros(4, dtype=torch.long)), 0), TypeError, "torch.float32 but the net's parameters are torch.float64"),
    ("classifier-diverged", lambda t: BackdoorClassifier(net(), losses=[InfTerm()]).training_step(
        (x, torch.zeros(4, dtype=torch.long)), 0), FloatingPointError, "training diverged"),
    ("cli-test-without-checkpoint", lambda t: main(["test", "--config", str(DETECT)]), SystemExit,
     "no --ckpt_path.*untrained"),
    ("cli-missing-init-weights", lambda t: main(["fit", "--config", str(ADAPTIVE_SCALE_UP)]), SystemExit,
     "checkpoints/quickstart/last.ckpt.*not found.*configs/quickstart.yaml` first"),
    # detectors (issue 12: TeCo, ShrinkPad, DeepSweep, Frequency, BaDExpert)
    ("teco-unknown-corruption", lambda t: TeCo(corruptions=["gaussian_noise", "fisheye"]), ValueError,
     "unknown corruption 'fisheye'"),
    ("teco-severity-out-of-range", lambda t: TeCo(severities=[0, 6]), ValueError, "severities must be in 1\\.\\.\\.5"),
    ("shrink-pad-shrink-too-large", lambda t: ShrinkPad(shrink=28).score(net(), x), ValueError,
     "shrink=28 is not smaller than the image size 28x28"),
    ("frequency-not-fitted", lambda t: Frequency().score(net(), x), RuntimeError, "must be fitted on benign data"),
    ("frequency-other-image-size", lambda t: frequency_fitted_on_8x8().score(net(), x), ValueError,
     "fitted on images of shape \\(1, 8, 8\\)"),
    ("badexpert-no-trainable-parameters", lambda t: BaDExpert().fit(frozen_net(), (x, torch.arange(4))), ValueError,
     "no trainable parameters"),
    ("badexpert-too-few-fit-samples", lambda t: BaDExpert().fit(net(), (x, torch.arange(4))), ValueError,
     "at least 10 benign fitting samples"),
    # sanitisers and certified bounds
    ("sanitizer-bad-percentile", lambda t: Sphere(percentile=0), ValueError, "percentile must be in \\(0, 100\\]"),
    ("sanitizer-class-too-small", lambda t: Sphere().fit(torch.rand(5, 3), torch.tensor([0, 0, 1, 1, 2])), ValueError,
     "at least 2 samples.*class 2: 1"),
    ("sanitizer-nan-features", lambda t: Slab(mode="data").sanitize(nan_features(), torch.arange(6) % 2), ValueError,
     "features contain NaN or Inf"),
    ("sanitizer-extractor-not-2d", lambda t: extract_features(labelled_dataset(4), lambda im: im.sum((1, 2, 3))),
     ValueError, "2-D after flattening, got shape \\(4,\\)"),
    ("sanitizer-oracle-without-clean", lambda t: Sphere().sanitize(torch.rand(6, 3), torch.arange(6) % 2), ValueError,
     "needs a trusted clean set"),
    ("sanitizer-unknown-name", lambda t: create_sanitizer("spheres"), ValueError, "unknown sanitizer 'spheres'.*sphere"),
    ("datamodule-oracle-sanitizer-no-clean-set", lambda t: dm(sanitizer=Sphere(), defense_size=0).setup(), ValueError,
     "defense_size=0"),
    ("certified-epsilon-out-of-range", lambda t: certify(*two_blobs(), epsilon=1.0, rho=1.0), ValueError,
     "epsilon must be in \\[0, 1\\)"),
    ("certified-rho-not-positive", lambda t: certify(*two_blobs(), epsilon=0.1, rho=0.0), ValueError, "rho must be > 0"),
    ("certified-non-convex-loss", lambda t: certify(*two_blobs(), epsilon=0.1, rho=1.0, loss="zero_one"), ValueError,
     "loss 'zero_one' is not convex"),
    ("certified-non-binary-labels", lambda t: feasible_set(torch.rand(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])),
     ValueError, "binary class indices"),
    ("batt-zero-angle", lambda t: BATT(angle=0), ValueError, "angle=0 is a whole turn, so the rotation trigger would "
     "be the identity"),
    ("batt-zero-shift", lambda t: BATT(transform="translate", shift=(0, 0)), ValueError,
     "shift=\\(0, 0\\) would make the trigger the identity"),
    ("batt-shift-outside-image", lambda t: BATT(transform="translate", shift=(0, 28))(x), ValueError,
     "moves the whole 28x28 image out of the frame"),
    ("batt-clean-jitter-reaches-trigger", lambda t: BATT(clean_strength=1.0), ValueError,
     "clean_strength must be in \\[0, 1\\)"),
    ("adaptive-blend-more-pieces-than-pixels", lambda t: AdaptiveBlend(pieces=(32, 32))(x), ValueError,
     "splits a 28x28 trigger into more pieces than it has pixels"),
    ("adaptive-blend-pieces-not-square", lambda t: AdaptiveBlend(pieces=10), ValueError,
     "pieces=10 is not a square number"),
    ("adaptive-train-pieces-above-pieces", lambda t: AdaptiveBlend(pieces=16, train_pieces=20), ValueError,
     "train_pieces=20 is more than the 16 pieces"),
    ("adaptive-patch-more-pieces-than-pixels", lambda t: AdaptivePatch(patch_size=3, num_patches=100)(x), ValueError,
     "num_patches=100 patches of 3x3 do not fit side by side in a 28x28 image"),
    ("adaptive-patch-one-piece", lambda t: AdaptivePatch(num_patches=1), ValueError, "num_patches must be >= 2"),
    ("physical-ba-scale-range", lambda t: PhysicalBA(scale=(0.9, 0.5)), ValueError,
     "scale must be a \\(low, high\\) pair with 0 < low <= high <= 1"),
    ("physical-ba-no-transforms", lambda t: PhysicalBA(degrees=0, scale=1.0, flip_p=0, brightness=0, contrast=0),
     UserWarning, "every transform is off .* so this is BadNets"),
    ("attack-clean-label-no-target-samples",
     lambda t: create_attack("label_consistent", steps=1).fit(TensorDataset(x, torch.tensor([0, 1, 2, 1])), 3),
     ValueError, "clean-label attack but the dataset has no samples of the target class 3"),
    ("attack-surrogate-wrong-classes",
     lambda t: create_attack("tuap", surrogate=create_model("small_cnn", num_classes=2, in_channels=1, width=4)).fit(
         TensorDataset(x, torch.tensor([0, 1, 2, 3])), 1),
     ValueError, "surrogate outputs 2 logits but the data has 4 classes"),
    ("attack-surrogate-wrong-channels",
     lambda t: create_attack("narcissus", surrogate=create_model("small_cnn", in_channels=3, width=4)).fit(
         TensorDataset(x, torch.tensor([0, 1, 2, 3])), 1),
     ValueError, "surrogate takes 3-channel images but the data has 1 channels"),
    ("attack-eps-not-positive", lambda t: create_attack("label_consistent", eps=0.0), ValueError, "eps must be > 0"),
    ("attack-step-size-not-positive", lambda t: create_attack("tuap", step_size=-1 / 255), ValueError,
     "step_size must be > 0"),
    ("attack-pgd-steps-zero", lambda t: create_attack("label_consistent", steps=0), ValueError, "steps must be >= 1"),
    ("attack-issba-code-too-long", lambda t: create_attack("issba", code_bits=4, code="10110"), ValueError,
     "code has 5 bits but the encoder hides code_bits=4"),
    ("attack-issba-code-bits-beyond-encoder", lambda t: create_attack("issba", code_bits=100), ValueError,
     "code_bits=100 is longer than the encoder supports"),
    ("attack-fitted-used-before-fit", lambda t: create_attack("tuap")(x), RuntimeError,
     "has no perturbation yet: call fit"),
    ("neural-cleanse-one-class-model", lambda t: NeuralCleanse(steps=2).fit(one_class_net(), nc_data()), ValueError,
     "returns 1 output"),
    ("neural-cleanse-asr-threshold-out-of-range", lambda t: NeuralCleanse(asr_threshold=1.5), ValueError,
     "asr_threshold must be in \\(0, 1\\]"),
    ("neural-cleanse-asr-threshold-zero", lambda t: NeuralCleanse(asr_threshold=0.0), ValueError,
     "asr_threshold must be in \\(0, 1\\]"),
    ("neural-cleanse-negative-lambda", lambda t: NeuralCleanse(init_cost=-0.001), ValueError,
     "init_cost \\(the L1 weight lambda\\) must be > 0"),
    ("neural-cleanse-prune-unknown-layer", lambda t: nc_prune_unknown_layer(), ValueError,
     "layer='layer9' is not a submodule of the model; known layers: conv1"),
    ("neural-cleanse-filter-unknown-layer", lambda t: NeuralCleanseFilter(layer="penultimate").fit(net(), nc_data()),
     ValueError, "layer='penultimate' is not a submodule"),
    ("neural-cleanse-no-clean-data", lambda t: NeuralCleanse().fit(net(), None), ValueError,
     "needs clean labelled images .* got clean=None"),
    ("neural-cleanse-empty-clean-loader", lambda t: nc_empty_loader(), ValueError,
     "needs clean labelled images .* empty dataset"),
    ("neural-cleanse-prune-before-fit", lambda t: NeuralCleanse().prune(net(), nc_data()), RuntimeError,
     "must be fitted before pruning"),
    ("iad-shares-leave-no-clean-samples", lambda t: IAD(backdoor_share=0.5, cross_share=0.5), ValueError,
     "backdoor_share \\+ cross_share must be < 1"),
    ("iad-generator-output-shape", lambda t: IAD(pattern_generator=torch.nn.Conv2d(1, 2, 1), hidden=4).build(
        1, 28, 28).trigger(x), ValueError, "pattern_generator must return a tensor shaped like its input"),
    ("classifier-batch-attack-not-a-batch-attack", lambda t: BackdoorClassifier(net(), batch_attack=BadNets()),
     TypeError, "batch_attack must be a lightning_backdoor.attacks.BatchAttack"),
    ("sra-unsupported-architecture", lambda t: SRA(BadNets(), steps=1).edit(
        create_model("small_cnn", num_classes=10, in_channels=1), x, 0), ValueError,
     "does not support the architecture SmallCNN; supported: CifarResNet"),
    ("sra-slice-too-wide", lambda t: SRA(BadNets(), width=4, steps=1).edit(
        create_model("resnet20", num_classes=10, in_channels=1, width=4), x, 0), ValueError,
     "width=4 is too wide for layer 'conv1' with 4 channels"),
    ("sra-target-outside-classes", lambda t: SRA(BadNets(), steps=1).edit(
        create_model("resnet20", num_classes=10, in_channels=1, width=4), x, 10), ValueError, "target must be"),
]


class TupleNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = TinyResNet()

    def forward(self, x):
        return self.body(x), x.mean()


class DictNet(TupleNet):
    num_classes, in_channels = 10, 1

    def forward(self, x):
        return {"logits": self.body(x), "features": x.flatten(1)}


class InfTerm(torch.nn.Module):
    name = "inf"

    def forward(self, model, x, y, poisoned, original_y, target=None, logits=None):
        return logits.sum() * float("inf")


def detect_without_target():
    loader = DataLoader(TensorDataset(x, torch.arange(4)), batch_size=4)
    cb = DetectionCallback([ScaleUp()], stages="test", benign_loader=loader, poisoned_loader=loader, progress=False,
                           plots=False)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[cb],
                        enable_model_summary=False)
    trainer.test(BackdoorClassifier(net()), dataloaders=loader)


def metrics_on_all_target_labels():
    loader = DataLoader(TensorDataset(x, torch.zeros(4, dtype=torch.long)), batch_size=4)
    cb = BackdoorMetrics(clean_loader=loader, poisoned_loader=loader, target=0, stages="test")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[cb],
                        enable_model_summary=False)
    trainer.test(BackdoorClassifier(net()), dataloaders=loader)


def nc_data():
    return torch.rand(8, 1, 28, 28), torch.arange(8) % 4


def one_class_net():
    torch.manual_seed(0)
    return TinyResNet(num_classes=1)


def nc_prune_unknown_layer():
    nc = NeuralCleanse(steps=2, batch_size=4).fit(net(), nc_data())
    nc.prune(net(), nc_data(), layer="layer9")


def nc_empty_loader():
    NeuralCleanse(steps=2).fit(net(), DataLoader(TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0).long())))


def doc_row_ids():
    return re.findall(r"^\|\s*`([a-z0-9-]+)`\s*\|", DOC.read_text(), flags=re.M)


def test_table_and_cases_name_the_same_rows():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 20
    assert doc_row_ids() == ids


@pytest.mark.parametrize("row, fn, error, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_clearly(row, fn, error, match, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-backdoor"])
    monkeypatch.chdir(tmp_path)
    if issubclass(error, Warning):  # accepted, but the user is told what has no effect or little meaning
        with pytest.warns(error, match=match):
            fn(tmp_path)
        return
    with pytest.raises(error, match=match or None) as info:
        fn(tmp_path)
    if error is not SystemExit:
        assert not isinstance(info.value, (IndexError, KeyError, AttributeError))
