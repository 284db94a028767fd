"""What stands before the API processes: HAProxy, admission control and the per-key rate limit."""
