"""Controlled experiments behind mansu's claims (mansu.science.phase: the reversal's phase diagram)."""
