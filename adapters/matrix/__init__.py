"""Matrix rooms (any Synapse, PubHubs hubs) through a Matrix Application Service (docs/matrix.md).

``adapter`` is the platform (``kind = "matrix"``); ``appservice`` the routes the
homeserver calls; ``decode``/``encode`` the pure translation; ``outbound`` the
ghosts and sends; ``client`` the HTTP side; ``media`` the attachment links;
``registration`` the ``civic-gateway matrix registration`` command."""
