"""The model boundary: shared types, identity, the warm runner and the back-ends."""
