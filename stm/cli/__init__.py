"""Thin click commands over the stm library."""
