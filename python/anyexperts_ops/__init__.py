"""AnyExperts routing ops for dynamic-expert Mixture-of-Experts layers.

Importing this package registers torch.ops.anyexperts.*; see DESIGN.md section 3.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import reference
from .ops import (add_virtual, grouped_mm, grouped_mm_wgrad, hsm, permute, segmented_topk,
                  swiglu, unpermute)

__all__ = ["segmented_topk", "permute", "grouped_mm", "grouped_mm_wgrad", "swiglu", "hsm",
           "unpermute", "add_virtual", "reference"]
__version__ = "0.1.0"

# The AnyExperts MoE layer, its presets and routing statistics (issue 5).
from . import presets, stats  # noqa: E402
from .layer import AnyExpertsConfig, AnyExpertsMoE  # noqa: E402
from .stats import MoEAux, RoutingRecord, RoutingStats, StatsMeter  # noqa: E402

__all__ += ["AnyExpertsConfig", "AnyExpertsMoE", "MoEAux", "RoutingRecord", "RoutingStats",
            "StatsMeter", "presets", "stats"]
