"""Relearning attacks on an unlearned model and the run's durability certificate (mansu.attack.relearn)."""
