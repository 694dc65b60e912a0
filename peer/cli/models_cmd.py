"""`edgeswarm models ...` and `edgeswarm infer --local` (filled in by the edge-models work)."""
