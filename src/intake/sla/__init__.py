"""Deadlines: the pure SLA engine, stored deadlines, reminders, digests and figures."""
