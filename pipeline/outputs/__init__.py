"""The result objects: what a destination asks for, what the writers share, and each writer."""
