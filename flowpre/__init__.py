"""flowpre: pretrain DiT flow-matching models that sample in 1-8 steps."""
__version__ = "0.1.0"
