"""Parity tests against real serving engines (separate tier: each needs its engine's package)."""
