"""Simulated devices: communities, per-type behaviour from the thing models, an MQTT runner."""
