"""The engine's control plane: sequences, paged KV block bookkeeping and the scheduler (no torch)."""
