"""Headroom orchestrator: emulated edge testbed for partitioned LLM inference.

Division of labour:
- ``testbed.spec.loader``      YAML -> frozen, validated specs (topology, experiment); error reporting.
- ``testbed.core.placement``   the placement contract shared by partitioners, cost models and backends.
- ``testbed.partition``   pure planners (snapshot -> placement) and cost models; no I/O.
- ``testbed.core.cluster``     the ``Cluster`` protocol every backend implements.
- ``testbed.emulation.network``     the only module that turns a topology spec into a live Mininet network.
- ``testbed.run.controller``  per-epoch loop: scenario -> apply -> snapshot -> plan -> migrate -> tokens.
- ``testbed.run.recorder``    the run directory (append-only events, per-token table, summary).
- ``testbed.cli``         the ``headroom`` command.
"""
