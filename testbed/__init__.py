"""Headroom orchestrator: emulated edge testbed for partitioned LLM inference.

Data flow (docs/architecture.md draws it):  YAML -> ``spec`` -> ``run`` (per decision epoch:
``Cluster.snapshot`` -> ``partition.plan`` -> ``Cluster.migrate`` -> tokens) -> run directory ->
``analysis``. Division of labour:
- ``testbed.core``       contracts: placement, snapshot, the ``Cluster`` protocol, moves, errors.
- ``testbed.spec``       YAML -> frozen, validated specs; scenario expansion, models, profiles, generators.
- ``testbed.partition``  pure planners (snapshot -> placement), their cost models and the algorithm registry.
- ``testbed.emulation``  the only package that turns a topology spec into a live network (Mininet, tc, cgroups).
- ``testbed.backends``   ``Cluster`` implementations: ``emulated`` (node agents), ``simulated``, ``ssh`` (real devices).
- ``testbed.run``        control loop, runner, recorder, typed events and the one summary fold.
- ``testbed.cli``        the ``headroom`` command.
"""
