"""Lightning callbacks: backdoor detection, Neural Cleanse and BA/ASR for any LightningModule."""

from .backdoor_metrics import BackdoorMetrics
from .detection import DetectionCallback
from .model_edit import ModelEditCallback
from .neural_cleanse import NeuralCleanseCallback

__all__ = ["BackdoorMetrics", "DetectionCallback", "ModelEditCallback", "NeuralCleanseCallback"]
