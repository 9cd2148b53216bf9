"""The running service: serve, the processor, the scheduler, metrics and logs."""
