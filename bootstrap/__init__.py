"""Bootstrap node: a long-lived DHT server and gossip relay for operators."""
