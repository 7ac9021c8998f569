"""Tables and figures, read only from saved metrics and arrays."""
