"""What a run or a study left behind, read and drawn: shared by tools/plot_metrics.py, tools/plot_schedule.py
and the benchmarks in bench/.

    metrics.py  reading: metrics.json (detectron2's JSONWriter), layer_stats.jsonl (the monitor), per-part
                series, the ordering of detector parts
    plots.py    the matplotlib figures: a run's metrics (the papers' figures), an LR schedule, the study
    study.py    the large-batch study's arms and results: resolving an arm's config, summarising its output
                directory, the markdown table

Nothing here is imported by the trainer; matplotlib is imported only when a figure is drawn.
"""
