"""Demo community sites for ``civic-gateway demo``: small, real webhook clients."""
