"""Quality measures of rendered videos (QC) and, later, of trained models (evaluation)."""
