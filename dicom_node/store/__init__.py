"""What survives a crash: the SQLite state store, its schema, the spool on disk, retention."""
