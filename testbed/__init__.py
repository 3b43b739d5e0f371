"""Headroom orchestrator: emulated edge testbed for partitioned LLM inference.

Division of labour:
- ``testbed.config``      YAML -> frozen, validated specs (topology, experiment); error reporting.
- ``testbed.placement``   the placement contract shared by partitioners, cost models and backends.
- ``testbed.partition``   pure planners (snapshot -> placement) and cost models; no I/O.
- ``testbed.cluster``     the ``Cluster`` protocol every backend implements.
- ``testbed.network``     the only module that turns a topology spec into a live Mininet network.
- ``testbed.controller``  per-epoch loop: scenario -> apply -> snapshot -> plan -> migrate -> tokens.
- ``testbed.recorder``    the run directory (append-only events, per-token table, summary).
- ``testbed.cli``         the ``headroom`` command.
"""
