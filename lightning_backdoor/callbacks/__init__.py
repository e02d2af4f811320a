"""Lightning callbacks: backdoor detection and BA/ASR for any LightningModule."""

from .backdoor_metrics import BackdoorMetrics
from .detection import DetectionCallback
from .model_edit import ModelEditCallback

__all__ = ["BackdoorMetrics", "DetectionCallback", "ModelEditCallback"]
