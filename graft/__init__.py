"""graft: filter grafting (Meng et al., CVPR 2020) for torchrun."""

from .errors import quiet_start_under_graft_run

quiet_start_under_graft_run()  # before torch's import, which a Ctrl-C may interrupt

from .core import (  # noqa: E402 (after the signal handler above)
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
from .grafter import Grafter  # noqa: E402
from .ring import GraftResult  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "GraftPlan", "GraftReport", "GraftResult", "Grafter", "adaptive_weight", "count_invalid_filters",
    "filter_entropy", "graft_state_dict", "graft_with_entropies", "make_plan", "module_plan", "peer_distances",
    "plan_entropies", "reference_entropy", "weight_entropies", "weight_entropy",
]
