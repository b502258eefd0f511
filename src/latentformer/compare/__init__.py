"""The attention-variant study (`latentformer compare`): a matrix of ordinary training runs at
matched parameters and tokens (matrix), run and resumed cell by cell, one process per GPU
(runner), measured for quality, speed and KV-cache memory (measure), and reported as
results.json, report.md, report.html and figures (report)."""
