"""The ``Cluster`` implementations (``emulated``: Mininet + cgroups + node agents; ``simulated``:
replay of the cost model in simulated time) and the per-core speed calibration both use."""
