"""Faults: schedules of injected faults (spec), the step hooks that inject them in an island
(inject), the supervisor that sends crashes and hangs from outside (chaos) and the report of
which guard caught each fault and what it cost (survival). Scaffolding for proving fault
tolerance: nothing in train/ or fleet/ imports it (tests/unit/test_imports.py)."""
