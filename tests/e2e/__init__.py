"""End-to-end tests: simulator -> broker -> gateway -> incident.

A package, so that its module names may repeat those of tests/unit (test_scenarios.py).
"""
