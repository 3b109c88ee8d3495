"""Foundations every package uses: errors and exit statuses, units, repository paths, test hooks."""
