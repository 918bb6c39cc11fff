"""Prometheus metrics of the gateway: volumes go here, never to the log."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

MESSAGES = Counter(
    "sc_messages",
    "MQTT messages taken, by device type and outcome (stored, rejected, duplicate; priority_stored, "
    "priority_rejected, priority_duplicate: the priority lane's copies of urgent events, which the other "
    "workers count as well)",
    ["device_type", "outcome"],
    registry=REGISTRY,
)
REJECTS = Counter(
    "sc_rejects", "messages set aside in the dead-letter store, by reason", ["reason"], registry=REGISTRY
)
TS_SKEWED = Counter(
    "sc_ts_untrusted", "device timestamps not trusted (too far ahead or too old)", registry=REGISTRY
)
POINTS_WRITTEN = Counter("sc_points_written", "points accepted by InfluxDB", registry=REGISTRY)
POINTS_SPOOLED = Counter(
    "sc_points_spooled", "points written to the local spool while InfluxDB was unreachable", registry=REGISTRY
)
BATCH_POINTS = Histogram(
    "sc_batch_points",
    "points per InfluxDB write",
    registry=REGISTRY,
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 50000),
)
WRITE_SECONDS = Histogram(
    "sc_write_seconds",
    "InfluxDB write latency",
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WRITE_ERRORS = Counter("sc_write_errors", "failed InfluxDB writes by outcome", ["outcome"], registry=REGISTRY)
SPOOL_BYTES = Gauge("sc_spool_bytes", "bytes waiting in the spool", registry=REGISTRY)
SPOOL_SEGMENTS = Gauge("sc_spool_segments", "segments waiting in the spool", registry=REGISTRY)
BROKER_CONNECTED = Gauge("sc_broker_connected", "1 while connected to the MQTT broker", registry=REGISTRY)
INFLUX_UP = Gauge("sc_influx_up", "1 while InfluxDB accepts writes", registry=REGISTRY)
UNACKED = Gauge(
    "sc_unacked_messages", "messages received but not yet acknowledged to the broker", registry=REGISTRY
)
REGISTRY_DEVICES = Gauge("sc_registry_devices", "devices in the in-memory registry", registry=REGISTRY)
STORED_LATENCY = Histogram(
    "sc_stored_latency_seconds",
    "device time (or receive time) to durably stored, sampled 1 in 4 messages",
    registry=REGISTRY,
    buckets=(
        0.005,
        0.01,
        0.02,
        0.03,
        0.05,
        0.075,
        0.1,
        0.15,
        0.2,
        0.3,
        0.5,
        0.75,
        1,
        1.5,
        2,
        3,
        5,
        10,
        30,
        60,
    ),
)
RULES_BACKLOG = Gauge(
    "sc_rules_backlog",
    "stored readings this worker holds for the rules process because its queue is full",
    registry=REGISTRY,
)
RULES_SENT = Counter("sc_rules_observations", "observations handed to the rules process", registry=REGISTRY)
RULES_SENT_URGENT = Counter(
    "sc_rules_urgent_observations",
    "urgent events (SC_BATCH_URGENT_TYPES) handed to the rules process at decode, ahead of storage",
    registry=REGISTRY,
)
