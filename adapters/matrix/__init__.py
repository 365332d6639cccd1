"""Matrix rooms (any Synapse, PubHubs hubs) through a Matrix Application Service (docs/matrix.md).

So far: the platform's settings (``config``) and the appservice registration
file an operator gives Synapse (``registration``, the ``civic-gateway matrix
registration`` command)."""
