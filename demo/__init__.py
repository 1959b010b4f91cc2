"""Demo and test tooling: the synthetic phantom model and phantom studies.

Not part of the product: the container image leaves this package out, and the node
imports it only in its ``demo-model`` and ``demo-study`` commands.
"""
