"""Training-data cleaning: exact and near duplicates, quality filters, conflicting examples, PII, and
contamination by evaluation files, with every removed or changed record kept aside (`leanlm data clean`)."""

from leanlm.clean.config import CleanConfig, load_config
from leanlm.clean.run import clean

__all__ = ["CleanConfig", "clean", "load_config"]
