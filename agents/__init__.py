"""Agents for TokenMask-v0: a local-context extractor, per-token actor-critic policies, algorithms by name."""

from agents.algorithms import ALGORITHMS, AlgorithmSpec, canonical_name, get_algorithm, load_model, make_model
from agents.extractor import LocalContextExtractor
from agents.policy import (
    MaskableTokenActorCriticPolicy,
    MaskableTokenBernoulliDistribution,
    RecurrentTokenActorCriticPolicy,
    TokenActorCriticPolicy,
    TokenBernoulliDistribution,
)

__all__ = [
    "ALGORITHMS",
    "AlgorithmSpec",
    "LocalContextExtractor",
    "MaskableTokenActorCriticPolicy",
    "MaskableTokenBernoulliDistribution",
    "RecurrentTokenActorCriticPolicy",
    "TokenActorCriticPolicy",
    "TokenBernoulliDistribution",
    "canonical_name",
    "get_algorithm",
    "load_model",
    "make_model",
]
