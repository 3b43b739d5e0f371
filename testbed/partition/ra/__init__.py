"""The resource-aware head-level planner: the decision (``planner``), the greedy rounds
(``greedy``, ``decode``), and the choice against the current placement (``choice``)."""
