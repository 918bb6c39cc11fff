"""Governance incidents: classification, routing, lifecycle and the signed CloudEvents envelope (pure)."""
