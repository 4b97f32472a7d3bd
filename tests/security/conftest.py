"""Security tests attack the real local stack (the e2e ``stack``: nats-server, etcd +
kube-apiserver + KWOK, the five service processes) as a compromised peer would: a client that can
publish on the bus. Every attack must be refused and leave Leases, Pods and statuses as they were.
"""

from tests.e2e.conftest import clean, pytest_runtest_makereport, stack

__all__ = ["clean", "pytest_runtest_makereport", "stack"]
