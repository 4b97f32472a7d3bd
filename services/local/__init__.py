"""Local embedded mode: the whole of Jobtree on one machine with one command (``jobtree-local``).

See ``docs/local.md``. :mod:`services.local.stack` holds the code path shared with the
end-to-end tests.
"""
