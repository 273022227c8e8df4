"""The `federated` recipe step: federated LoRA (simulated on Flower) on the model as the recipe holds it,
merged back in place, so a recipe can quantize, then fine-tune across clients (QLoRA), then export:

    steps:
      - {type: gptq, bits: 4, group_size: 64}
      - {type: federated, clients: 4, rounds: 5, compress: int8}      # or data: [hospital/, bank/]

The model goes to the step's work directory once (the clients load it in their own processes), the run
writes its report beside it, and the merged (requantized) weights are copied back into the recipe's model."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from leanlm.core.step import StepConfig, StepContext, register_step
from leanlm.errors import ConfigError
from leanlm.federate.config import FederateConfig


@dataclass
class FederatedConfig(StepConfig, FederateConfig):
    data: list[str] = field(default_factory=list)  # one directory or file per client (default: the built-in
    # corpus dealt to `clients` by `split`)
    reshapes_model = False


def _federated_step(model: nn.Module, config: FederatedConfig, ctx: StepContext) -> dict:
    import tempfile

    from leanlm.federate.run import federate
    from leanlm.models.load import load_model
    from leanlm.models.save import save_model

    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(FederateConfig)}
    scratch = None if ctx.work_dir else tempfile.mkdtemp(prefix="leanlm-federated-")
    work = Path(ctx.work_dir or scratch) / "federated"
    try:
        resume = ctx.resume and (work / ".run.federate" / "state.json").exists()
        if not resume:
            shutil.rmtree(work / "base", ignore_errors=True)
            save_model(model, ctx.tokenizer, work / "base")
        report = federate(str(work / "base"), work / "run", data=config.data or None, config=settings,
                          resume=resume, overwrite=True)
        merged = load_model(work / "run" / "model", "cpu").model
        missing, unexpected = model.load_state_dict(merged.state_dict(), strict=False)
        if missing or unexpected:
            raise ConfigError(f"the federated model does not fit back into the recipe's model (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}); run `leanlm federate` on the saved model")
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"clients": report["clients"], "rounds": len(report["history"]) - 1,
            "perplexity_before": report["perplexity_before"], "perplexity_adapter": report["perplexity_adapter"],
            "perplexity_after": report["perplexity_after"], "quantized_base": report["quantized_base"],
            "bytes_up_per_client_round": report["bytes_up_per_client_round"], "dropped": report["dropped"],
            "rejected": report["rejected"]}


register_step("federated", FederatedConfig, handler=_federated_step)
