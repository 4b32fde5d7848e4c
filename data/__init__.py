"""llava-lite data package."""
