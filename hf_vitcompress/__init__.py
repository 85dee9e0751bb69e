"""hf_vitcompress: make Vision Transformers smaller and faster while keeping them Hugging Face models.

``import hf_vitcompress`` registers the compressed model classes with transformers' Auto factories,
so ``AutoModelForImageClassification.from_pretrained`` loads compressed checkpoints.
"""

from .budget import BudgetError
from .calibration.data import CalibrationDataError
from .calibration.gram import LayerStatistics, NonFiniteActivationError
from .compress import compress
from .configuration import CompressionConfig
from .evaluation import EvaluationReport, evaluate_model
from .families.beit import CompressedBeitConfig, CompressedBeitForImageClassification, CompressedBeitModel
from .families.clip import (
    CompressedCLIPConfig,
    CompressedCLIPModel,
    CompressedCLIPVisionConfig,
    CompressedCLIPVisionModel,
    CompressedCLIPVisionModelWithProjection,
)
from .families.data2vec_vision import (
    CompressedData2VecVisionConfig,
    CompressedData2VecVisionForImageClassification,
    CompressedData2VecVisionModel,
)
from .families.deit import (
    CompressedDeiTConfig,
    CompressedDeiTForImageClassification,
    CompressedDeiTForImageClassificationWithTeacher,
    CompressedDeiTModel,
)
from .families.dinov2 import (
    CompressedDinov2Backbone,
    CompressedDinov2Config,
    CompressedDinov2ForImageClassification,
    CompressedDinov2Model,
    CompressedDinov2WithRegistersBackbone,
    CompressedDinov2WithRegistersConfig,
    CompressedDinov2WithRegistersForImageClassification,
    CompressedDinov2WithRegistersModel,
)
from .families.siglip import (
    CompressedSiglipConfig,
    CompressedSiglipModel,
    CompressedSiglipVisionConfig,
    CompressedSiglipVisionModel,
)
from .families.swin import (
    CompressedSwinBackbone,
    CompressedSwinConfig,
    CompressedSwinForImageClassification,
    CompressedSwinModel,
)
from .families.swinv2 import (
    CompressedSwinv2Backbone,
    CompressedSwinv2Config,
    CompressedSwinv2ForImageClassification,
    CompressedSwinv2Model,
)
from .families.vit import CompressedViTConfig, CompressedViTForImageClassification, CompressedViTModel
from .layers import LowRankLinear, SkippedBlock
from .methods.pruning.structure import PruningError
from .plan import CompressionPlan, LayerPlan, PlanMismatchError, count_parameters
from .shared_input import SharedInputMixin, merge_shared_input
from .tuning import LayerTiming, TuningError, tune

__version__ = "0.2.0.dev0"

# Importing transformers' Trainer costs seconds: the training and Hub parts load on first use.
_LAZY = {
    "CompressionCallback": ".training",
    "CompressionController": ".training",
    "DistillationArguments": ".training",
    "DistillationTrainer": ".training",
    "FixedMasks": ".training",
    "Schedule": ".training",
    "search_ranks": ".methods.head_factorization.search",
    "PruningTrainer": ".methods.pruning.trainer",
    "RankSearchError": ".methods.head_factorization.search",
    "HubTokenError": ".hub",
    "ModelCardTemplateError": ".hub",
    "build_model_card": ".hub",
    "push_model_to_hub": ".hub",
    "OnnxExportError": ".export",
    "OnnxExportReport": ".export",
    "export_onnx": ".export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BudgetError",
    "OnnxExportError",
    "OnnxExportReport",
    "export_onnx",
    "CompressionCallback",
    "CompressionController",
    "DistillationArguments",
    "DistillationTrainer",
    "EvaluationReport",
    "FixedMasks",
    "HubTokenError",
    "ModelCardTemplateError",
    "Schedule",
    "build_model_card",
    "evaluate_model",
    "push_model_to_hub",
    "RankSearchError",
    "PruningError",
    "PruningTrainer",
    "SkippedBlock",
    "SharedInputMixin",
    "merge_shared_input",
    "search_ranks",
    "CalibrationDataError",
    "CompressedBeitConfig",
    "CompressedBeitForImageClassification",
    "CompressedBeitModel",
    "CompressedCLIPConfig",
    "CompressedCLIPModel",
    "CompressedCLIPVisionConfig",
    "CompressedCLIPVisionModel",
    "CompressedCLIPVisionModelWithProjection",
    "CompressedData2VecVisionConfig",
    "CompressedData2VecVisionForImageClassification",
    "CompressedData2VecVisionModel",
    "CompressedDeiTConfig",
    "CompressedDeiTForImageClassification",
    "CompressedDeiTForImageClassificationWithTeacher",
    "CompressedDeiTModel",
    "CompressedDinov2Backbone",
    "CompressedDinov2Config",
    "CompressedDinov2ForImageClassification",
    "CompressedDinov2Model",
    "CompressedDinov2WithRegistersBackbone",
    "CompressedDinov2WithRegistersConfig",
    "CompressedDinov2WithRegistersForImageClassification",
    "CompressedDinov2WithRegistersModel",
    "CompressedSiglipConfig",
    "CompressedSiglipModel",
    "CompressedSiglipVisionConfig",
    "CompressedSiglipVisionModel",
    "CompressedSwinBackbone",
    "CompressedSwinConfig",
    "CompressedSwinForImageClassification",
    "CompressedSwinModel",
    "CompressedSwinv2Backbone",
    "CompressedSwinv2Config",
    "CompressedSwinv2ForImageClassification",
    "CompressedSwinv2Model",
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
    "LayerTiming",
    "TuningError",
    "tune",
]
