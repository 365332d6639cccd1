"""Matrix rooms (any Synapse, PubHubs hubs) through a Matrix Application Service (docs/matrix.md).

``adapter`` is the platform (``kind = "matrix"``) and wires the rest;
``config`` its settings; ``inbound`` the routes the homeserver calls
(transactions in); ``decode``/``encode`` the pure translation; ``outbound``
the ghosts and sends; ``homeserver`` the client-server API calls (HTTP to the
homeserver); ``media`` the attachment links; ``registration`` the
``civic-gateway matrix registration`` command."""
