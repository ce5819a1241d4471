"""Downstream benchmarks of a checkpoint through the LM Evaluation Harness: `python -m megamobi.eval`
(docs/eval.md). Not to be confused with `megamobi.evaluate`, the loss/perplexity of a checkpoint on
token shards.

    suite.py         the paper's nine benchmarks, shots, metrics and its published MobiLlama rows
    model_source.py  --checkpoint -> a Hugging Face directory (megamobi checkpoints exported once, cached)
    runner.py        one lm-eval task at a time; a missing dataset is one clear line, not a stop
    report.py        the Table 4 layout and the JSON record (metrics, stderr, versions, provenance)
    sweep.py         --checkpoints RUN_DIR: eval.csv over a run's checkpoints, resumable
    cli.py           the command line
"""
