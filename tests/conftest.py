"""Suite-wide: processes started by tests found and join cheap test networks.

The default identity cost (``ledger_pow_bits``, about a CPU-minute) is a network
setting a bootstrap node writes into the genesis it founds; every process a test
starts through the CLI inherits this cheap one unless the test says otherwise.
"""

import os

os.environ.setdefault("EDGESWARM_LEDGER_POW_BITS", "8")
