"""Fine-tuning: full or LoRA (PEFT) on domain text or chat data, merged into the weights for serving."""

from leanlm.finetune.finetune import FinetuneConfig, causal_lm_loss, finetune_

__all__ = ["FinetuneConfig", "finetune_", "causal_lm_loss"]
