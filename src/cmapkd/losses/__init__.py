"""CMAPKD loss terms (METHOD.md section 4) and baseline losses."""
