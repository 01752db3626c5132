"""graft: filter grafting (Meng et al., CVPR 2020) for torchrun."""

from .core import (
    GraftPlan,
    GraftReport,
    adaptive_weight,
    count_invalid_filters,
    filter_entropy,
    graft_state_dict,
    graft_with_entropies,
    make_plan,
    module_plan,
    peer_distances,
    plan_entropies,
    reference_entropy,
    weight_entropies,
    weight_entropy,
)
from .grafter import Grafter
from .ring import GraftResult

__version__ = "0.1.0"
__all__ = [
    "GraftPlan", "GraftReport", "GraftResult", "Grafter", "adaptive_weight", "count_invalid_filters",
    "filter_entropy", "graft_state_dict", "graft_with_entropies", "make_plan", "module_plan", "peer_distances",
    "plan_entropies", "reference_entropy", "weight_entropies", "weight_entropy",
]
