"""The HTTP edge: validates, enqueues, reads job records and events. Loads no model."""
