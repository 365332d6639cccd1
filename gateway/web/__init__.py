"""The gateway's HTTP side: the server and its socket (``server``), the public
routes (``routes``) and the operator's admin API (``admin``). These modules
get the running gateway as a ``view.GatewayView`` and never import
``gateway.runtime``, which builds them."""
