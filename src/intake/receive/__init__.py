"""Mail coming in: the SMTP listener, which only stores."""
