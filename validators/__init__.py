"""Validators: prove a converted checkpoint is complete, exact and kernel-ready.

They read the output (and, with --source, the source) and never import the writer.
"""
