"""The binder service: the single writer of Leases, Pods and Services."""
