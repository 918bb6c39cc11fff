"""Alembic migrations of the gateway's SQL schema (run them with `sc-gateway db migrate`)."""
