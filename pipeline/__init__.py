"""Pure processing: from a list of DICOM instance files to one DICOM SEG dataset."""
