"""llava-lite train package."""
