"""Faults: schedules of injected faults (spec), the step hooks that inject them in an island
(inject), and the supervisor that sends crashes and hangs from outside and tells what each cost
(chaos). Scaffolding for proving fault tolerance: nothing in train/ or fleet/ imports it."""
