"""Durable state: the tables, engine and sessions, schema migrations, backups, the raw inbound store."""
