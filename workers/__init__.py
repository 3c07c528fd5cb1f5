"""Celery app, tasks, per-process engine preload, heartbeats and the command line."""
