"""The resolver service: Reservation activation (cuts + seeded lottery) and node-failure swaps."""
