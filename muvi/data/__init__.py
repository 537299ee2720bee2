"""Data helpers: real music with an exact beat grid, rendered from MIDI."""
