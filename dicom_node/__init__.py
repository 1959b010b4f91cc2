"""The DICOM node: network edges, spool, durable state, completion, worker and CLI."""
