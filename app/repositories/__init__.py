"""Repositories: the only modules that write SQL."""
