"""Training on a merged CoOpt dataset: RELA (coopt), BYOL and supervised objectives, linear probe,
comparisons over seeds, and trained students exported in timm's Hub format.

Typical use:
    data = load_training_data("org/digits-coopt", revision="v1")
    result = train(TrainConfig(arch="resnet18", objective="coopt", epochs=10), data)
    rows = compare_objectives(data, TrainConfig(arch="resnet18", epochs=10), seeds=3)
    comparison = summarize(rows, origin=data.origin)   # means, 95% intervals, verdicts, speedup
"""

from coopt_hub.training.augment import BYOL_VIEWS, RELA_VIEWS, AugmentConfig, ViewPair
from coopt_hub.training.compare import (
    DEFAULT_VARIANTS,
    Comparison,
    ComparisonRow,
    Variant,
    compare_objectives,
    format_table,
    summarize,
)
from coopt_hub.training.data import (
    DatasetOrigin,
    LabeledImages,
    MissingTargetsError,
    TargetTable,
    TrainingData,
    TrainingDataError,
    join_on_id,
    load_training_data,
    prepare_training_data,
    read_targets_file,
)
from coopt_hub.training.models import BackboneConfig, build_backbone
from coopt_hub.training.objectives import ByolConfig
from coopt_hub.training.probe import ProbeConfig, evaluate_probe
from coopt_hub.training.trainer import EvalPoint, TrainConfig, TrainResult, make_accelerator, train

__all__ = [
    "AugmentConfig",
    "BYOL_VIEWS",
    "BackboneConfig",
    "ByolConfig",
    "Comparison",
    "ComparisonRow",
    "DEFAULT_VARIANTS",
    "DatasetOrigin",
    "EvalPoint",
    "LabeledImages",
    "MissingTargetsError",
    "ProbeConfig",
    "RELA_VIEWS",
    "TargetTable",
    "TrainConfig",
    "TrainResult",
    "TrainingData",
    "TrainingDataError",
    "Variant",
    "ViewPair",
    "build_backbone",
    "compare_objectives",
    "evaluate_probe",
    "format_table",
    "join_on_id",
    "load_training_data",
    "make_accelerator",
    "prepare_training_data",
    "read_targets_file",
    "summarize",
    "train",
]
