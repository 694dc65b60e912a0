"""Embed an edgeswarm peer in an app and run jobs through the market.

    python docs/examples/embed.py /ip4/127.0.0.1/tcp/4101/p2p/12D3KooW...

(the argument is a bootstrap node's full multiaddr, as `edgeswarm bootstrap` logs it).
"""

import sys

import trio

from edge_models.text import minilm_tokenizer, sentence_embeddings
from peer.config import load_config
from peer.node import open_peer


async def main(bootstrap: str) -> None:
    config = load_config(cli={"bootstrap": [bootstrap]})
    inputs = minilm_tokenizer().encode(["Edge devices can run neural networks locally."])
    async with open_peer(config) as peer:
        # One job: gossip auction, award to the best bid, result + signed receipt.
        result = await peer.infer("minilm", inputs, max_price=2.0, deadline=10.0)
        print(result.executor, result.price / 1e6, "credits", f"{result.latency_ms:.0f} ms")
        result.receipt.verify()  # anyone can check it offline
        print(sentence_embeddings(result.outputs, inputs).shape)  # (1, 384)
        # Many jobs: hold one executor, stream jobs over one connection, one receipt per batch.
        async with peer.lease("minilm", max_jobs=1000, seconds=60, max_price=2.0) as lease:
            for _ in range(100):
                await lease.infer(inputs)
        print(f"{len(lease.receipts)} batch receipt(s) for 100 jobs")
        for ad in await peer.find_ads():  # who offers what
            print(ad.peer_id, [m.name for m in ad.models], ad.price)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
