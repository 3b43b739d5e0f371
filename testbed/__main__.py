"""``python -m testbed`` runs the headroom CLI."""
from testbed.cli import main

main()
