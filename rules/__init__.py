"""The rules engine: rule kinds (one module each), rule files, and the pure engine (see README.md)."""
