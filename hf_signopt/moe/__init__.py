"""Loss-free load-balanced Mixture-of-Experts."""

from .balance_callback import LossFreeBalanceCallback
from .balancer import LoadBalanceMetrics, LossFreeBalancer

__all__ = ["LoadBalanceMetrics", "LossFreeBalanceCallback", "LossFreeBalancer"]
