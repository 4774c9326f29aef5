"""Example handlers used by the tutorial (docs/tutorial.md); run by the test suite so they keep working."""
