"""Federated LoRA fine-tuning on Flower: `leanlm federate` and `leanlm.federate.federate(...)`."""

from leanlm.federate.config import FederateConfig, FederateError
from leanlm.federate.run import federate

__all__ = ["FederateConfig", "FederateError", "federate"]
