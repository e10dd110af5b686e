"""A VQ-VAE vector quantizer whose codes are kept in use by loss-free balancing (seed 004).

Codebook collapse, where a few codes take every vector and the rest are never chosen, is a load-balancing problem:
each vector picks `argmin_k ||z - e_k||^2 + bias_k`, and after each optimizer step the bias of an over-used code goes up
and that of an under-used one down, by the same update as the MoE routers' (`bias_update`). The bias only chooses;
the quantized vector, the losses and the gradients are those of VQ-VAE (van den Oord et al. 2017).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..bias_balancing import (
    DEFAULT_UPDATE_RATE,
    DEFAULT_UPDATE_RULE,
    Float32Bias,
    FollowsOptimizerSteps,
    all_reduce_counts,
    bias_update,
    validate_update_rate,
    validate_update_rule,
)


@dataclass
class VectorQuantizerOutput(ModelOutput):
    """Output of `BalancedVectorQuantizer`.

    Attributes:
        quantized: The chosen codes, shaped like the input; in backward the straight-through estimator passes the
            gradient to the input unchanged.
        indices: int64 code index of every vector, the input's shape without its last dimension.
        loss: Codebook loss plus `commitment_cost` times the commitment loss (scalar).
    """

    quantized: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    loss: torch.Tensor | None = None


class BalancedVectorQuantizer(Float32Bias, FollowsOptimizerSteps, nn.Module):
    """Vector quantizer with a straight-through estimator whose code choice is balanced without an auxiliary loss.

    Every vector `z` (the input's last dimension) is replaced by the code `e_k` with
    `k = argmin_k ||z - e_k||^2 + code_bias[k]`. The loss is `||sg[z] - e_k||^2 + commitment_cost * ||z - sg[e_k]||^2`
    (means over the elements), and the output `z + sg[e_k - z]`. `code_bias` is a float32 buffer (saved in the
    `state_dict`, float32 under `.half()`) that only chooses; training forwards (training mode, grad enabled) count
    the codes chosen, and each update moves it by `bias_update(..., minimize=True)`: up for the codes chosen more than
    the mean, down for the others.

    By default the update follows the optimizer step, as the MoE balancing does: after every optimizer step that holds
    the codebook (torch's optimizer step post-hook, left out of steps compiled with `torch.compile`), once, if codes
    were counted since. With `follow_optimizer=False`, or after a compiled step, call `step()`.

    Args:
        num_codes: Codebook size `K`.
        dim: Size of each code and of the input's last dimension.
        commitment_cost: Weight `beta` of the commitment loss (VQ-VAE: 0.25).
        update_rate: Bias step per update, in units of the squared distance; 0 freezes the bias (plain VQ).
        update_rule: One of `("sign", "rms", "linear")` (see `bias_update`).
        follow_optimizer: Update after every optimizer step that trains the codebook.
        process_group: Data-parallel group over which the counts are summed; the default group when None.

    Raises:
        ValueError: If a size is not a positive int, `commitment_cost` is not finite and >= 0, or the rate or rule is
            invalid.

    Example:
        ```python
        quantizer = BalancedVectorQuantizer(num_codes=64, dim=8, update_rate=1e-2)
        out = quantizer(encoder(x))
        loss = F.mse_loss(decoder(out.quantized), x) + out.loss
        loss.backward()
        optimizer.step()  # also moves quantizer.code_bias
        ```
    """

    float32_bias_name = "code_bias"

    def __init__(
        self,
        num_codes: int,
        dim: int,
        commitment_cost: float = 0.25,
        update_rate: float = DEFAULT_UPDATE_RATE,
        update_rule: str = DEFAULT_UPDATE_RULE,
        follow_optimizer: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_codes", num_codes), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_codes, self.dim = num_codes, dim
        self.commitment_cost = validate_update_rate(commitment_cost, "commitment_cost")
        self.update_rate = validate_update_rate(update_rate, "update_rate")
        self.update_rule = validate_update_rule(update_rule, "update_rule")
        self.follow_optimizer = follow_optimizer
        self.process_group = process_group
        self.codebook = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes))
        self.register_buffer("code_bias", torch.zeros(num_codes, dtype=torch.float32))
        # Not a buffer: DDP would broadcast rank 0's counts over the others' before every forward.
        self._counts = torch.zeros(num_codes, dtype=torch.int64)
        self._follow_optimizer_steps(follow_optimizer)

    def __setstate__(self, state: dict) -> None:
        # A copy (deepcopy, pickle) follows the optimizer step as the original does.
        super().__setstate__(state)
        self._follow_optimizer_steps(self.follow_optimizer)

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, commitment_cost={self.commitment_cost}, "
            f"update_rate={self.update_rate}, update_rule={self.update_rule!r}"
        )

    def forward(self, inputs: torch.Tensor) -> VectorQuantizerOutput:
        """Quantize `inputs` of shape `(..., dim)`.

        Returns:
            `VectorQuantizerOutput` with `quantized`, `indices` and `loss`.
        """
        if inputs.shape[-1] != self.dim:
            raise ValueError(f"inputs must have last dimension dim={self.dim}, got shape {tuple(inputs.shape)}")
        flat = inputs.reshape(-1, self.dim)
        with torch.no_grad():
            distances = (
                flat.square().sum(dim=1, keepdim=True) - 2 * flat @ self.codebook.T + self.codebook.square().sum(dim=1)
            )
            indices = (distances.float() + self.code_bias).argmin(dim=1)
        if self.training and torch.is_grad_enabled():
            self._count(indices)
        codes = F.embedding(indices, self.codebook)
        loss = F.mse_loss(codes, flat.detach()) + self.commitment_cost * F.mse_loss(flat, codes.detach())
        quantized = flat + (codes - flat).detach()
        return VectorQuantizerOutput(
            quantized=quantized.view_as(inputs), indices=indices.view(inputs.shape[:-1]), loss=loss
        )

    def _count(self, indices: torch.Tensor) -> None:
        if self._counts.device != indices.device:
            self._counts = self._counts.to(indices.device)
        self._counts += torch.bincount(indices, minlength=self.num_codes)
        self._counted = True

    def _followed_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameters()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Sum the counts across ranks (one collective), move `code_bias`, zero the counts. No host synchronization.

        Returns:
            The number of vectors each code took since the previous update, int64 of shape `(num_codes,)`.
        """
        counts = self._counts
        all_reduce_counts(counts, self.process_group)
        num_codes = torch.full((1,), self.num_codes, device=counts.device)
        increment = bias_update(counts[None], num_codes, self.update_rule, self.update_rate, minimize=True)[0]
        self.code_bias += increment.to(self.code_bias.device)
        usage = counts.clone()
        counts.zero_()
        self._counted = False
        return usage
