"""The typed job config, its presets and overrides, and the batch arithmetic."""
