"""Recipes (typed, strict step configs), the optimize pipeline and its report."""
