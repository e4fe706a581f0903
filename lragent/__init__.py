"""lragent: train and serve shared-A multi-LoRA role adapters from one shared cache."""
__version__ = "0.1.0"
