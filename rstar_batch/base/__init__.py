"""The ground floor: the vocabulary every other module shares (column names, id
hashing and bucketing, the ranking order, the filesystem layer). Nothing here
imports from the rest of the package but config.py's ConfigError."""
