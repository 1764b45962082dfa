"""Explorers: the figures and widgets the notebooks show (one Lab, one show)."""
