"""Loss-free balancing beyond MoE routing (seed 004): a balanced assignment solver and a balanced VQ codebook."""

from .solver import balanced_assignment
from .vector_quantizer import BalancedVectorQuantizer, VectorQuantizerOutput

__all__ = ["BalancedVectorQuantizer", "VectorQuantizerOutput", "balanced_assignment"]
