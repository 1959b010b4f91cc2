from dicom_node.cli import main

# nnU-Net starts worker processes with spawn, which re-imports this module: guard it.
if __name__ == "__main__":
    raise SystemExit(main())
