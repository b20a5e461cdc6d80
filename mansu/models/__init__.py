"""Loading HF causal LMs, the demo model, component naming and hooks."""
