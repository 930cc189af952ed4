"""Scoring: caption metrics (pycocoevalcap), diagnostics as the report shows them, and statistics over
seeds (mean ± spread, paired differences to a baseline)."""
