"""Pure, sans-IO protocol logic for edgeswarm.

Nothing in this package performs I/O, reads the clock or draws randomness:
callers pass bytes, events, ``now`` and random values in, and get events,
actions and bytes back. See DESIGN.md, "Layers".
"""
