"""layerfreeze: freeze and unfreeze chosen layers of a PyTorch model during
training, correctly and cheaply.

The core is :func:`select`, :func:`freeze`, :func:`unfreeze`, :func:`frozen`
and one error family; :class:`Freezer`, :class:`Schedule` and every
integration are built on those.
"""

from .core import Transition, apply_change, freeze, frozen, subscribe, unfreeze
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    CacheError,
    CacheTypeError,
    FrozenParameterChanged,
    LayerFreezeError,
    OptimizerSyncError,
    RankMismatchError,
    ScheduleError,
    ScheduleTypeError,
    SelectorError,
    SelectorTypeError,
    StateDictError,
)
from .feature_cache import CacheStats, cache, precompute
from .freezer import Freezer
from .frozenbn import FrozenBatchNorm, freeze_batchnorm, unfreeze_batchnorm
from .layerdecay import layer_decay_groups
from .memory import MemoryReport, memory_report
from .report import ParamCount, count_parameters, summary
from .rules import (
    AdaptiveFreezeRule,
    FreezeRule,
    GradualUnfreezeRule,
    PlateauUnfreezeRule,
    ProgressiveFreezeRule,
    Rule,
)
from .schedule import Schedule
from .selectors import select
from .skip import SkipStats
from .timeline import TimelineRow, plot_timeline
from .warmup import Warmup

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "CacheStats",
    "CacheTypeError",
    "MemoryReport",
    "cache",
    "memory_report",
    "precompute",
    "AdaptiveFreezeRule",
    "FreezeRule",
    "GradualUnfreezeRule",
    "PlateauUnfreezeRule",
    "ProgressiveFreezeRule",
    "Rule",
    "TimelineRow",
    "plot_timeline",
    "ArgumentError",
    "ArgumentTypeError",
    "Freezer",
    "FrozenParameterChanged",
    "LayerFreezeError",
    "OptimizerSyncError",
    "ParamCount",
    "RankMismatchError",
    "Schedule",
    "ScheduleError",
    "ScheduleTypeError",
    "SelectorError",
    "SelectorTypeError",
    "StateDictError",
    "Transition",
    "Warmup",
    "apply_change",
    "count_parameters",
    "freeze",
    "frozen",
    "FrozenBatchNorm",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
    "layer_decay_groups",
    "select",
    "SkipStats",
    "subscribe",
    "summary",
    "unfreeze",
]
