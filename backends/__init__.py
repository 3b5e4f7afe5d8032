"""What a backend is: its configuration, live state, frozen snapshots and engine adapters."""
