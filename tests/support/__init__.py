"""What the tests start and check: one module per peer (dcmtk, Orthanc, Redis, the node)
or concern (paths and ports, waiting, assertions). Each peer runs on 127.0.0.1."""
