"""Routed FP8 block-scale MoE backends the kernel check can run, and how one is chosen."""
