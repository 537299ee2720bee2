"""The networks of muvi, one architecture per file, each with a config dataclass."""
