"""Running an experiment: the per-algorithm control loop, the runner over algorithms and repetitions,
the run directory (recorder), typed events with the one summary fold, and one-shot planning."""
