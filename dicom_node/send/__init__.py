"""The way out: one sender per protocol (DIMSE C-STORE, DICOMweb STOW-RS) behind one interface."""
