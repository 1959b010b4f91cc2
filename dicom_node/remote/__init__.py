"""GPU workers over Celery and Redis: the messages, the node's client, the worker process."""
