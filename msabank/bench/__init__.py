"""msabank's benchmarks, one package: `routing` (routing latency vs bank size against the HBM and
tensor-core floors; content-fetch bandwidth), `lifecycle` (ingest, update, ask on the embedded model),
`storage` (bank writes, reads and updates at the MSA-4B geometry), `e2e` (time to first token, decode and
ingest at a model geometry beside floors from the same run, and an official-style baseline). `msabank bench` (cli/bench.py) parses,
calls these and renders; they import the same kernel references the tests use. The server's benchmark
lives with the server (msabank/serve/bench.py).
"""
