"""Contracts every other package relies on: placement, snapshot, the Cluster protocol, moves, errors.

Pure data and pure functions; no I/O, no torch. ``node_agent`` imports only from here."""
