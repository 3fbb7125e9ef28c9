"""Shared test support: the truth (hook clones), toy models, hypothesis strategies, the model registry and matrix checker."""
