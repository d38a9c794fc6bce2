"""Helpers of the reliability tests: worker processes killed at chosen points, crafted result files, the
pipeline run end to end, and the figures they report."""
