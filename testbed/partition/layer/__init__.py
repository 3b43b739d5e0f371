"""Layer- and block-level baselines: EdgeShard (static and dynamic) and Galaxy, greedy, round-robin."""
