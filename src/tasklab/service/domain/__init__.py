"""The shop and data sync, independent of HTTP: queries, order settlement, sync, seed, checks."""
