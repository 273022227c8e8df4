"""Training: the Accelerate loop that fine-tuning, distillation and (next) federated rounds share, and the
examples it trains on (plain text windows, or chat turns with only the assistant's tokens labelled)."""
