"""What an operator sees over HTTP: health, readiness, metrics and the status page."""
