"""Unlearning: objectives, the circuit-restricted null-space projection, the diagonal-Fisher retain bound,
the NF4 magnitude floor, MANSU's loop and the baselines (one interface, the same per-step stats)."""
