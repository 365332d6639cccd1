"""Prometheus metrics, on a registry of the gateway's own (no global state).

Names follow Prometheus conventions; every label set is small and bounded
(platform names come from config, types and reasons from code)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

T = TypeVar("T")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.events_in = Counter("civic_events_in", "Events accepted from a platform and stored.",
                                 ["platform", "type"], registry=r)
        self.events_out = Counter("civic_events_out", "Events delivered to a platform.",
                                  ["platform", "type"], registry=r)
        self.decode_errors = Counter("civic_decode_errors", "Inbound requests refused as malformed or unauthorised.",
                                     ["platform", "status"], registry=r)
        self.dropped = Counter("civic_dropped", "Inbound events not relayed, by reason (duplicate, echo, banned, ...).",
                               ["platform", "reason"], registry=r)
        self.degraded = Counter("civic_degraded", "Parts of events fitted to what a target can express.",
                                ["reason"], registry=r)
        self.latency = Histogram("civic_delivery_latency_seconds", "From acceptance to confirmed delivery.",
                                 ["platform"], buckets=LATENCY_BUCKETS, registry=r)
        self.retries = Counter("civic_delivery_retries", "Delivery attempts that failed and will be retried.",
                               ["platform"], registry=r)
        self.dead_lettered = Counter("civic_dead_lettered", "Events moved to the dead letters.",
                                     ["platform"], registry=r)
        self.dead_letters = Gauge("civic_dead_letters", "Events in the dead-letter list now.", registry=r)
        self.queue_depth = Gauge("civic_queue_depth", "Undelivered events per target platform.",
                                 ["platform"], registry=r)
        self.partitions_owned = Gauge("civic_cluster_partitions_owned",
                                      "Partitions of target groups this node delivers now (cluster).", registry=r)
        self.cluster_nodes = Gauge("civic_cluster_nodes", "Live nodes this node sees in the cluster.", registry=r)
        self.bus_connected = Gauge("civic_bus_connected", "1 while the cluster bus is connected.", registry=r)
        self.ban_rules = Gauge("civic_ban_rules", "Ban rules each platform contributes now (e.g. from policy lists).",
                               ["platform"], registry=r)
        self.platform_up = Gauge("civic_platform_up", "1 while a platform can move events, 0 while it cannot"
                                 " (broker or homeserver unreachable; /readyz says why).", ["platform"], registry=r)
        self.store_up = Gauge("civic_store_up", "1 while the store takes transactions, 0 while it is unreachable"
                              " (intake answers 503).", registry=r)
        self.overloaded = Counter("civic_overload_refusals", "Inbound requests refused with 429/503.",
                                  ["platform", "status"], registry=r)
        self.body_bytes_in_flight = Gauge("civic_body_bytes_in_flight",
                                          "Bytes of request bodies being received now (gateway.intake).", registry=r)
        self.bodies_refused = Counter("civic_bodies_refused", "Request bodies not read: 413 too large, "
                                      "408 too slow, 503 too many at once.", ["status"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_SHARED: "weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Any]]" = weakref.WeakKeyDictionary()


def shared_collector(registry: CollectorRegistry, name: str, make: Callable[[], T]) -> T:
    """The collector ``name`` of ``registry``, made and registered on first use.
    For adapters that keep plain counters and report them when Prometheus
    scrapes: one collector per kind serves every platform of that kind (a
    second registration of the same metric names would be refused)."""
    per = _SHARED.setdefault(registry, {})
    found = per.get(name)
    if found is None:
        found = per[name] = make()
        registry.register(found)
    return found  # type: ignore[no-any-return]
