"""Mail going out: one composer with the templates, and the outbox, the only sender."""
