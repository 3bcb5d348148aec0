"""Lowest layer: helpers with no project imports, usable from every stage (training and inference)."""
