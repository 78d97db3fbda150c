"""RetinaFace core: model, anchors, box coding, pre/post-processing, weights, loss, evaluation, face alignment.

Pure PyTorch, numpy and OpenCV; nothing here imports Ray.
"""

from .align import AlignedFaces, align_faces
from .config import CONFIGS, RetinaFaceConfig, get_config
from .detector import Detector, DetectorSettings
from .model import RetinaFace, RetinaFaceOutput
from .postprocessing import Detections
from .preprocessing import InputScale, InvalidImageError
from .storage import StorageOptions
from .tta import TTA
from .weights import PRETRAINED, CheckpointError, load_weights

__all__ = [
    "AlignedFaces",
    "CONFIGS",
    "PRETRAINED",
    "CheckpointError",
    "Detections",
    "Detector",
    "DetectorSettings",
    "InputScale",
    "InvalidImageError",
    "RetinaFace",
    "RetinaFaceConfig",
    "RetinaFaceOutput",
    "StorageOptions",
    "TTA",
    "align_faces",
    "get_config",
    "load_weights",
]
