"""``python -m omniframe`` runs the command line."""

from omniframe.cli import main

main()
