"""``kubectl runs``: the Jobtree kubectl plugin (executable ``kubectl-runs``).

A thin shell over ``shared.cli.views``: it talks to the live cluster through the kubeconfig
(never a local state file), and prints tables, JSON or YAML. See ``docs/kubectl-runs.md``.
"""
