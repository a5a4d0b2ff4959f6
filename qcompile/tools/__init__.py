"""Tools on top of everything: the command line, accuracy tables, benchmarks, shipped models."""
