"""llava-lite serve package."""
