"""The simulated backend: the decode cost model replayed in simulated time (no root, no agents)."""
