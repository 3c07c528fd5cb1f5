"""The domain: settings, types, search stages, fusion, ingest and store adapters.

Imports neither FastAPI nor Celery, so the API and the workers can share it.
"""
