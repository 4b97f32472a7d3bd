"""The packer service: placement plans on the topology view, and node failure detection."""
