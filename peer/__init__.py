"""The edgeswarm peer: the only layer that does I/O (network, disk, threads)."""
