"""`python -m msabank.bench routing|fetch|all --out DIR` (the routing benchmark's own entry point)."""

from msabank.bench.routing import main

main()
