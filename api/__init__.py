"""The REST API (FastAPI): routes by user, API-key auth; `api.app.create_app`. See api/README.md."""
