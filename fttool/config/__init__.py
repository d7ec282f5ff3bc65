"""Configuration: overrides and recipes composed into one checked, frozen RunSpec (no torch here)."""
