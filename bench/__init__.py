"""Studies behind the numbers in the docs; each is `python -m bench.<study> --help` from the
repository root and writes one JSON report (bench/README.md is the index)."""
