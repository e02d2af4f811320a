"""Image classifiers with input normalisation built in, and their registry.

Every model takes pixels in ``[0, 1]`` and starts with its own ``normalize`` module, exposes
``num_classes``/``in_channels``, a final ``fc`` layer and ``forward_features`` (penultimate
features), and is traceable by ``torch.fx.symbolic_trace``.

    net = create_model("resnet18", num_classes=10, **DATASET_STATS["cifar10"])
    list_models("resnet*")   # ['resnet18', 'resnet20', 'resnet34']
"""

from ._base import ImageClassifier
from ._factory import MODELS, create_model, list_models
from .cnn import BadNetsCNN, SmallCNN
from .normalize import DATASET_STATS, Normalize
from .outputs import LogitsOf, check_logits
from .resnet import BasicBlock, CifarResNet, resnet18, resnet20, resnet34
from .vgg import VGG, vgg11_bn, vgg16_bn, vgg19_bn

__all__ = [
    "MODELS",
    "create_model",
    "list_models",
    "LogitsOf",
    "Normalize",
    "check_logits",
    "DATASET_STATS",
    "ImageClassifier",
    "BadNetsCNN",
    "SmallCNN",
    "BasicBlock",
    "CifarResNet",
    "resnet18",
    "resnet34",
    "resnet20",
    "VGG",
    "vgg11_bn",
    "vgg16_bn",
    "vgg19_bn",
]
