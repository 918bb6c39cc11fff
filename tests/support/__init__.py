"""Test helpers that stand in for systems outside the project (an incident system's webhook receiver)."""
