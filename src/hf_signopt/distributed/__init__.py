"""Data-parallel communication for sign optimizers: signSGD / Signum with majority vote (1 bit per element)."""

from .majority_vote import (
    count_votes,
    enable_majority_vote,
    majority_vote_hook,
    majority_vote_signs,
    pack_votes,
    votes_in_step,
)

__all__ = ["count_votes", "enable_majority_vote", "majority_vote_hook", "majority_vote_signs", "pack_votes",
           "votes_in_step"]
