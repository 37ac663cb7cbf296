"""FCT Bench: a benchmark and evaluation suite for model compatibility in embedding retrieval.

``import fct`` stays light: torch, timm and faiss are imported by the modules that use them.
"""

__version__ = "0.1.0"
