"""Sparsity that turns into speed at run time: activation sparsity (TEAL-style thresholds with a
runtime that skips the weights of inactive inputs) and MoE-fication (dense FFNs split into routed
experts), and 2:4-pruned layers kept compressed for leanlm's GPU kernel (`sparse24_`)."""

from leanlm.sparsify.act_sparse_linear import ActSparseLinear
from leanlm.sparsify.act_sparsity import ActSparsityConfig, sparsify_activations_
from leanlm.sparsify.moe_ffn import MoEFFN
from leanlm.sparsify.moefy import MoefyConfig, moefy_
from leanlm.sparsify.sparse24 import Sparse24Config, Sparse24Linear, sparse24_

__all__ = ["ActSparseLinear", "ActSparsityConfig", "sparsify_activations_", "MoEFFN", "MoefyConfig", "moefy_", "Sparse24Config",
           "Sparse24Linear", "sparse24_"]
