"""Tasks, methods and runners for measuring LSA."""
