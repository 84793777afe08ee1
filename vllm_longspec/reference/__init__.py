"""Plain-torch references: slow, obviously correct, same signatures as the fast paths."""
