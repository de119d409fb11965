"""pytest plugin (placeholder until the testing-helpers work lands)."""
