"""Layer rules and their registry: the first rule whose `supports` matches a module handles it."""

from __future__ import annotations

from torch import nn

from groupclip.rules.base import EngineError, Factors, Rule
from groupclip.rules.conv import ConvRule
from groupclip.rules.embedding import EmbeddingRule
from groupclip.rules.generic import GenericRule
from groupclip.rules.linear import HFConv1DRule, LinearRule
from groupclip.rules.norms import GroupNormRule, InstanceNormRule, LayerNormRule, RMSNormRule
from groupclip.rules.vit import HFViTEmbeddingsRule

#: Ordered registry of dedicated rules. Modules matching none fall back to GENERIC.
REGISTRY: list[Rule] = [
    LinearRule(),
    HFConv1DRule(),
    ConvRule(),
    EmbeddingRule(),
    LayerNormRule(),
    RMSNormRule(),
    GroupNormRule(),
    InstanceNormRule(),
    HFViTEmbeddingsRule(),
]
GENERIC = GenericRule()

#: Modules whose forward uses its children's parameters directly: one generic unit covers the subtree.
WHOLE_MODULES: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.MultiheadAttention)


def rule_for(module: nn.Module) -> Rule:
    for rule in REGISTRY:
        if rule.supports(module):
            return rule
    return GENERIC


def register(rule: Rule, first: bool = True) -> None:
    """Add a user rule (checked before the built-in ones when `first`)."""
    if first:
        REGISTRY.insert(0, rule)
    else:
        REGISTRY.append(rule)


__all__ = ["EngineError", "Factors", "Rule", "REGISTRY", "GENERIC", "WHOLE_MODULES", "rule_for", "register"]
