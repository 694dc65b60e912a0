"""``python -m peer.cli`` runs the ``edgeswarm`` command."""

from peer.cli import main

main()
