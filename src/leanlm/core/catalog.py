"""Where each named thing is defined, as data: step types, runtime modules and commands.

Nothing here imports anything. A lookup (core.registry) imports just the module that defines the
name it needs, so parsing a recipe with an `rtn` step never imports MoE-fication, and loading a
checkpoint imports only the runtime modules it holds. Adding a step type, a runtime module or a
command is one new file plus one line below; tests/test_layering.py checks these tables against
what the modules register.
"""

# step type (a recipe's `type:`) -> the module that calls register_step for it
STEPS: dict[str, str] = {
    "rtn": "leanlm.quantize.rtn",
    "gptq": "leanlm.quantize.gptq",
    "awq": "leanlm.quantize.awq",
    "smoothquant": "leanlm.quantize.smoothquant",
    "mixed": "leanlm.quantize.mixed",
    "magnitude": "leanlm.prune.magnitude",
    "wanda": "leanlm.prune.wanda",
    "sparsegpt": "leanlm.prune.sparsegpt",
    "depth": "leanlm.prune.depth",
    "width": "leanlm.prune.width",
    "heads": "leanlm.prune.heads",
    "sparse24": "leanlm.sparsify.sparse24",
    "act_sparsity": "leanlm.sparsify.act_sparsity",
    "moefy": "leanlm.sparsify.moefy",
    "finetune": "leanlm.finetune.finetune",
    "distill": "leanlm.distill.distill",
    "cast": "leanlm.cast.cast",
    "lowrank": "leanlm.lowrank.lowrank",
    "federated": "leanlm.federate.step",
}

# runtime module scheme (as written in a leanlm checkpoint's leanlm.json) -> the module that registers it
RUNTIME_MODULES: dict[str, str] = {
    "int8_weight_only": "leanlm.quantize.int8_linear",
    "int8_tied_embedding": "leanlm.quantize.int8_embedding",
    "int4_weight_only": "leanlm.quantize.int4_linear",
    "int4_tied_embedding": "leanlm.quantize.int4_embedding",
    "w8a8_dynamic": "leanlm.quantize.w8a8_linear",
    "act_sparse": "leanlm.sparsify.act_sparse_linear",
    "norm_then_rotate": "leanlm.sparsify.rotated_norm",
    "moe_ffn": "leanlm.sparsify.moe_ffn",
    "sparse_2of4": "leanlm.sparsify.sparse24",
    "low_rank": "leanlm.lowrank.lowrank_linear",
}

# `leanlm COMMAND` -> the module with its add_parser(subparsers) and run(args)
COMMANDS: dict[str, str] = {
    "models": "leanlm.cli.models",
    "eval": "leanlm.cli.eval",
    "bench": "leanlm.cli.bench",
    "optimize": "leanlm.cli.optimize",
    "report": "leanlm.cli.report",
    "export": "leanlm.cli.export",
    "scan": "leanlm.cli.scan",
    "finetune": "leanlm.cli.finetune",
    "distill": "leanlm.cli.distill",
    "recipes": "leanlm.cli.recipes",
    "auto": "leanlm.cli.auto",
    "serve": "leanlm.cli.serve",
    "loadtest": "leanlm.cli.loadtest",
    "cache": "leanlm.cli.cache",
    "data": "leanlm.cli.data",
    "prompt": "leanlm.cli.prompt",
    "federate": "leanlm.cli.federate",
}
