"""From instance files to a volume: series assembly, wholeness, classification, preprocessing."""
