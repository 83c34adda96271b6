"""mm-convert: MiniMax-M2 checkpoints to kernel-ready FP8 expert layouts.

Data flows one way: source -> plan -> (quant) -> profile -> writer -> manifest.
"""

__version__ = "0.1.0"
