"""`edgeswarm id|run|bootstrap|peers` (filled in by the peer-foundation work)."""
