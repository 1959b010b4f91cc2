"""The DICOM node, the service: receive, store, work, send, remote workers, web and CLI."""
