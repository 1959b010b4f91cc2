"""Pure processing: from a list of DICOM instance files to the result objects (SEG, RTSTRUCT, overlay, report)."""
