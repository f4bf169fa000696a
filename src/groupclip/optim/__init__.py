"""DP optimizer step."""
