"""hf_vitcompress: make Vision Transformers smaller and faster while keeping them Hugging Face models.

``import hf_vitcompress`` registers the compressed model classes with transformers' Auto factories,
so ``AutoModelForImageClassification.from_pretrained`` loads compressed checkpoints.
"""

from .budget import BudgetError
from .calibration.data import CalibrationDataError
from .calibration.gram import LayerStatistics, NonFiniteActivationError
from .compress import compress
from .configuration import CompressionConfig
from .families.deit import (
    CompressedDeiTConfig,
    CompressedDeiTForImageClassification,
    CompressedDeiTForImageClassificationWithTeacher,
    CompressedDeiTModel,
)
from .families.vit import CompressedViTConfig, CompressedViTForImageClassification, CompressedViTModel
from .layers import LowRankLinear
from .plan import CompressionPlan, LayerPlan, PlanMismatchError, count_parameters

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CalibrationDataError",
    "CompressedDeiTConfig",
    "CompressedDeiTForImageClassification",
    "CompressedDeiTForImageClassificationWithTeacher",
    "CompressedDeiTModel",
    "CompressedViTConfig",
    "CompressedViTForImageClassification",
    "CompressedViTModel",
    "CompressionConfig",
    "CompressionPlan",
    "LayerPlan",
    "LayerStatistics",
    "LowRankLinear",
    "NonFiniteActivationError",
    "PlanMismatchError",
    "compress",
    "count_parameters",
]
