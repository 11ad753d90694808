"""The built-in equivalence suites: each file a table of pairs and one generic test."""
