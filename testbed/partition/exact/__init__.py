"""The exact solver (``optimal``): MILPs (``milp``, ``decode``) and the certified serialised
search (``serial``)."""
