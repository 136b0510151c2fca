"""`orionlm eval`: perplexity, multiple-choice benchmarks, LAMBADA and GSM8K, scored as
lm-evaluation-harness does.

run.evaluate runs tasks and returns a JSON-ready dict (config, versions, per-task metrics with standard
errors, timing); report.format_table prints it like a model card and report.compare_table /
compare_chart put several side by side. tasks reads each benchmark's files, scoring computes
log-likelihoods and perplexity, hub fetches published items, leakage checks training data against
them and harness exposes orionlm models to lm-evaluation-harness.
"""
