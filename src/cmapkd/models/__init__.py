"""Tower adapters, the UCMP pyramids and the ALSN."""
