"""Trace-driven replay of the engine (``jobtree-replay``): a what-if for sizing envelopes."""
