"""The emulated network as an effect: Mininet hosts and links, tc shaping, routing, live link state,
cgroups, clean-up from manifests and the ``net check`` measurement. Needs root at run time."""
