"""Tickets: opening, threading, triage, milestones, credit, correspondence and mail commands."""
