"""Sparsity that turns into speed at run time: activation sparsity (TEAL-style thresholds with a
runtime that skips the weights of inactive inputs) and MoE-fication (dense FFNs split into routed
experts)."""

from leanlm.sparsify.act_sparse_linear import ActSparseLinear
from leanlm.sparsify.act_sparsity import ActSparsityConfig, sparsify_activations_
from leanlm.sparsify.moe_ffn import MoEFFN
from leanlm.sparsify.moefy import MoefyConfig, moefy_

__all__ = ["ActSparseLinear", "ActSparsityConfig", "sparsify_activations_", "MoEFFN", "MoefyConfig", "moefy_"]
