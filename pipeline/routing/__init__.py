"""Routing rules: the facts of a series and the declarative rules that match them."""
