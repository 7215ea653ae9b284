"""The decision core: pure state machines (events and time in, actions and log lines out).

Nothing in this package does I/O, reads the clock, sleeps or draws random numbers, and it imports
only the standard library and its own modules (tests/unit/test_core_purity.py enforces it).
"""
