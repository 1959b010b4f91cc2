"""The way in: the storage SCP and series completion."""
