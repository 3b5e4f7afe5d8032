"""Several sluiceway replicas as one: state shared through Redis (see leases.py)."""
