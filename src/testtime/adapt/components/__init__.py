"""Composable parts that method recipes are built from."""
