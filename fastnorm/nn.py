"""Layer classes (work in progress in this session)."""
