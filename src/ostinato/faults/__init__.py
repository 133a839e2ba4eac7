"""Faults: schedules of injected faults (spec), and where each second of a run went (goodput).

spec parses `--faults` text into validated `Fault`s, expanding random storms; goodput reads the
events the islands append to RUN_DIR/events.jsonl and splits island time into named categories.
"""
