"""graft: filter grafting (Meng et al., CVPR 2020) for torchrun and for training scripts of your own.

    import graft
    grafter = graft.Grafter()          # under graft-run SCRIPT.py, torchrun, or your own process group
    ...
    grafter.graft(model)               # at each epoch's end, on every rank

The names below are imported on first use, so that ``import graft.config`` (the launcher's
checks) does not pay for the rest.
"""

import importlib

from .errors import quiet_start_under_graft_run

quiet_start_under_graft_run()  # before torch's import, which a Ctrl-C may interrupt

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "Grafter": "grafter", "network_seed": "grafter", "unwrap": "grafter",
    "GraftSpec": "rules", "GraftReport": "rules", "graft_state_dict": "rules",
    "GraftResult": "exchange",
    "GraftPlan": "core", "adaptive_weight": "core", "count_invalid_filters": "core", "filter_entropy": "core",
    "invalid_in_both": "core",
    "make_plan": "core", "module_plan": "core", "peer_distances": "core", "plan_entropies": "core",
    "reference_entropy": "core", "weight_entropies": "core", "weight_entropy": "core",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'graft' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
